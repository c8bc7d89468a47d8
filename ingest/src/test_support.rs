//! A private `redis-server` for tests that stop, kill or restart Redis, so the
//! shared one and the tests using it are never disturbed. Built only for tests
//! (`cfg(test)` here, the `test-support` feature for other crates' tests).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` on a free loopback port, its data in a directory of its own.
/// Dropping it kills the server.
pub struct LocalRedis {
    port: u16,
    dir: PathBuf,
    appendfsync: Option<&'static str>,
    child: Option<Child>,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalRedis {
    /// Starts a server in `dir`. With `appendfsync` (`always`, `everysec`) it
    /// keeps an append-only file there and reloads it on restart; without, it
    /// keeps nothing on disk.
    pub fn start(dir: &Path, appendfsync: Option<&'static str>) -> std::io::Result<Self> {
        let mut r = Self {
            port: free_port()?,
            dir: dir.to_path_buf(),
            appendfsync,
            child: None,
        };
        r.spawn()?;
        Ok(r)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("");
        match self.appendfsync {
            Some(policy) => cmd
                .arg("--appendonly")
                .arg("yes")
                .arg("--appendfsync")
                .arg(policy),
            None => cmd.arg("--appendonly").arg("no"),
        };
        self.child = Some(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| std::io::Error::new(e.kind(), format!("redis-server: {e}")))?,
        );
        self.wait_ready()
    }

    fn wait_ready(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pong = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            // LOADING answers an error: the server is up but not ready.
            if pong.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "redis-server on port {} did not answer PING",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9: whatever it had not written to its append-only file is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
