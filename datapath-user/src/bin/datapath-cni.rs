//! `datapath-cni`: the CNI plugin. The runtime sets `CNI_COMMAND` and the
//! other `CNI_*` variables and writes the network configuration to stdin;
//! the plugin prints a result or an error structure on stdout and exits
//! non-zero on error. See [`datapath::cni`].

use std::{io::Read as _, process::ExitCode};

use datapath::cni::{
    self,
    types::{CniError, LATEST_VERSION, code},
};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let output = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => failure(CniError::new(
            code::IO_FAILURE,
            "cannot read the network configuration",
            format!("reading stdin: {e}"),
        )),
        Ok(_) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Err(e) => failure(CniError::failed(
                "cannot start the plugin",
                format!("tokio runtime: {e}"),
            )),
            Ok(runtime) => runtime.block_on(cni::run(|name| std::env::var(name).ok(), &stdin)),
        },
    };
    print!("{}", output.stdout);
    if output.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn failure(e: CniError) -> cni::Output {
    cni::Output {
        stdout: serde_json::to_string(&e.to_result(LATEST_VERSION)).unwrap_or_default(),
        success: false,
    }
}
