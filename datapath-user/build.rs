//! Builds the eBPF programs (datapath-ebpf) with nightly for
//! bpfel-unknown-none; the object lands in OUT_DIR and is embedded by
//! `datapath::EBPF_OBJECT`.
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "datapath-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../datapath-ebpf"),
        ..Default::default()
    };
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../datapath-common/src")
    );
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
