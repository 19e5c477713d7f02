//! nginx (Debian's) as an L7 router in a namespace: one server proxying
//! every request to one upstream, the way an ingress or a platform's router
//! sits in front of containers. Stopped and its files removed on drop.
//!
//! ```no_run
//! use datapath_tests::{netns::Netns, nginx::Nginx};
//!
//! let ns = Netns::new_unique();
//! let proxy = Nginx::start(&ns, None, 9080, "127.0.0.1:8080".parse().unwrap());
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{cgroup::Cgroup, names, netns::Netns, traffic, wait};

/// Where nginx is looked for besides `PATH` (Debian installs it in sbin).
const SBIN: [&str; 2] = ["/usr/sbin/nginx", "/sbin/nginx"];

/// A running nginx.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in `ns` (and in `cgroup`, if given) listening on
    /// `port`, proxying to `upstream`; returns once it accepts connections.
    pub fn start(ns: &Netns, cgroup: Option<&Cgroup>, port: u16, upstream: SocketAddr) -> Self {
        let dir = Path::new("/tmp").join(format!("{}-nginx", names::unique_name()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen {port};\n    location / {{ proxy_pass http://{upstream}; }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf_path.display()));
        let bin = crate::netns::which("nginx")
            .or_else(|| SBIN.iter().map(PathBuf::from).find(|p| p.is_file()))
            .expect("nginx is not installed (Debian: nginx-light)");
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(cg) = cgroup {
            cg.enter(&mut cmd);
        }
        let child = ns.spawn(&mut cmd);
        let mut nginx = Self { child, dir };
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let up = wait::within(Duration::from_secs(10), || {
            if let Ok(Some(_)) = nginx.child.try_wait() {
                return true;
            }
            traffic::tcp_connect(ns, listen, Duration::from_secs(1)).is_ok()
        });
        let exited = nginx.child.try_wait().ok().flatten();
        assert!(
            up && exited.is_none(),
            "nginx did not start ({exited:?}): {}",
            nginx.log()
        );
        nginx
    }

    /// Its error log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
