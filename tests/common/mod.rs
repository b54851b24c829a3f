//! Whole-daemon test harness: a real mosquitto on a loopback port, the simulated GPIO chip as its
//! own process (so it outlives the daemon, like real lines), the real `menshen` binary, and an MQTT
//! subscriber that records everything under `menshen/v1/#`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod schema;
pub mod site;

use menshen::hw::sim::{self, WorldOp};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_menshen");

/// The shared models directory (`MENSHEN_MODELS_DIR`, else `../shared/models`); the face images
/// are in `../data` beside it.
pub fn shared_models() -> PathBuf {
    std::env::var_os("MENSHEN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models"))
        .canonicalize()
        .expect("the shared models directory (set MENSHEN_MODELS_DIR)")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run `apt-get install mosquitto` (scripts/test.sh does it)");
}

/// Build `tests/support/{name}.c`, a simulated device loaded with LD_PRELOAD, into `dir`.
pub fn build_preload(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/support/{name}.c"));
    let out = dir.join(format!("{name}.so"));
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("a C compiler (cc) is needed to build the simulated devices: scripts/setup-deps.sh");
    assert!(st.success(), "building {} failed", src.display());
    out
}

/// Write `text` as `dir/mosquitto.conf`, start mosquitto on it and wait for its port.
fn spawn_mosquitto(port: u16, dir: &Path, text: &str) -> Child {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, text).unwrap();
    let child =
        Command::new(mosquitto_bin()).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    child
}

/// A mosquitto broker on a loopback port, stopped when dropped.
pub struct Broker {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start(port: u16) -> Broker {
        Broker::start_with(port, None)
    }

    /// A broker that requires this username and password (no anonymous access).
    pub fn start_with_login(port: u16, user: &str, password: &str) -> Broker {
        Broker::start_with(port, Some((user, password)))
    }

    fn start_with(port: u16, login: Option<(&str, &str)>) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // TCP_NODELAY on the broker's sockets, as docs/mqtt.md asks of a production broker: without
        // it every command's reply waits ~40 ms on a delayed ACK.
        let mut text =
            format!("listener {port} 127.0.0.1\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n");
        match login {
            None => text.push_str("allow_anonymous true\n"),
            Some((user, password)) => {
                let pw = dir.path().join("passwd");
                let st = Command::new("mosquitto_passwd")
                    .args(["-c", "-b"])
                    .arg(&pw)
                    .args([user, password])
                    .status()
                    .unwrap();
                assert!(st.success(), "mosquitto_passwd failed");
                text.push_str(&format!("allow_anonymous false\npassword_file {}\n", pw.display()));
            }
        }
        Broker::with_config(port, dir, &text)
    }

    /// A broker from a complete configuration text (TLS, ACL, ...) kept in `dir`.
    pub fn with_config(port: u16, dir: tempfile::TempDir, text: &str) -> Broker {
        let child = spawn_mosquitto(port, dir.path(), text);
        Broker { port, child, _dir: dir }
    }

    /// A broker that keeps its sessions and queued messages in `dir` across restarts (stop it
    /// with [`Broker::terminate`] so it saves them).
    pub fn start_persistent(port: u16, dir: &Path) -> Broker {
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence true\npersistence_location {}/\n\
             max_queued_messages 1000000\nmax_inflight_messages 100\nlog_dest file {}/mosquitto.log\nlog_type all\n",
            dir.display(),
            dir.display()
        );
        // mosquitto drops root privileges to its own user before it writes its files.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let child = spawn_mosquitto(port, dir, &text);
        Broker { port, child, _dir: tempfile::tempdir().unwrap() }
    }

    /// SIGHUP: mosquitto re-reads its password and ACL files.
    pub fn reload(&self) {
        Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().unwrap();
    }

    /// SIGTERM: mosquitto saves its persistence file and exits.
    pub fn terminate(mut self) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Events by seq, asserting that no seq was published with two different contents (re-sends of
/// the same content are fine).
pub fn events_by_seq(all: &[Value]) -> std::collections::HashMap<u64, Value> {
    let mut by_seq = std::collections::HashMap::new();
    for v in all {
        let seq = v["seq"].as_u64().unwrap();
        if let Some(prev) = by_seq.insert(seq, v.clone()) {
            assert_eq!(&prev, v, "seq {seq} was published with two different contents");
        }
    }
    by_seq
}

/// Whether this process may start programs under SCHED_FIFO (root with CAP_SYS_NICE, and a
/// `chrt` on the PATH).
pub fn realtime_allowed() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        Command::new("chrt")
            .args(["-f", "20", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// An MQTT subscriber recording (topic, payload, retain).
pub struct Subscriber {
    pub msgs: Arc<Mutex<Vec<(String, Value, bool)>>>,
    client: rumqttc::Client,
}

impl Subscriber {
    pub fn start(port: u16, filter: &str) -> Subscriber {
        let mut o = rumqttc::MqttOptions::new(format!("test-sub-{}", free_port()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = rumqttc::Client::new(o, 1000);
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).unwrap();
        let msgs: Arc<Mutex<Vec<(String, Value, bool)>>> = Arc::default();
        let subscribed = Arc::new(Mutex::new(false));
        let (m, s) = (msgs.clone(), subscribed.clone());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => *s.lock().unwrap() = true,
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        m.lock().unwrap().push((p.topic.clone(), v, p.retain));
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        assert!(wait_for(Duration::from_secs(10), || *subscribed.lock().unwrap()), "subscriber never got SUBACK");
        Subscriber { msgs, client }
    }

    pub fn events(&self, kind: &str) -> Vec<Value> {
        let suffix = format!("/event/{kind}");
        self.msgs.lock().unwrap().iter().filter(|(t, _, _)| t.ends_with(&suffix)).map(|(_, v, _)| v.clone()).collect()
    }

    /// Wait until `pred` holds for the access events, returning them.
    pub fn wait_events(&self, kind: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut last = Vec::new();
        wait_for(timeout, || {
            last = self.events(kind);
            pred(&last)
        });
        last
    }

    pub fn all(&self) -> Vec<(String, Value, bool)> {
        self.msgs.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// A BMS on `port`, once `gate` has said it is online (its retained status: it is subscribed).
pub fn bms_when_online(gate: &Gate, port: u16) -> Bms {
    let bms = Bms::connect(port);
    assert!(
        wait_for(Duration::from_secs(10), || bms.retained("/status").iter().any(|v| v["state"] == "online")),
        "gate never came online; log:\n{}",
        gate.log()
    );
    bms
}

/// A gate under test: its files, the sim chip process and the daemon process.
pub struct Gate {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    sim: Option<Child>,
    daemon: Option<Child>,
}

pub struct GateOpts {
    pub mqtt_port: u16,
    pub pulse_ms: u64,
    /// Adds a second door "side", fail-safe, with its own reader.
    pub fail_safe_door: bool,
}

impl Default for GateOpts {
    fn default() -> Self {
        GateOpts { mqtt_port: 1, pulse_ms: 500, fail_safe_door: false }
    }
}

impl Gate {
    pub fn new(opts: GateOpts) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sim.sock");
        let mut t: toml::Table = toml::from_str(menshen::config::DEFAULT_CONFIG).unwrap();
        t["gate"]
            .as_table_mut()
            .unwrap()
            .insert("state_dir".into(), dir.path().join("state").display().to_string().into());
        t["log"].as_table_mut().unwrap().insert("level".into(), "debug".into());
        let hw = t["hardware"].as_table_mut().unwrap();
        let sim = hw["sim"].as_table_mut().unwrap();
        sim.insert("socket".into(), socket.display().to_string().into());
        sim.insert("embedded".into(), false.into());
        let doors = t["doors"].as_array_mut().unwrap();
        doors[0].as_table_mut().unwrap().insert("pulse_ms".into(), (opts.pulse_ms as i64).into());
        if opts.fail_safe_door {
            let mut side = toml::Table::new();
            side.insert("name".into(), "side".into());
            side.insert("relay_pin".into(), 5.into());
            side.insert("fail_mode".into(), "safe".into());
            side.insert("pulse_ms".into(), (opts.pulse_ms as i64).into());
            doors.push(side.into());
            let mut r = toml::Table::new();
            r.insert("name".into(), "side".into());
            r.insert("door".into(), "side".into());
            r.insert("formats".into(), toml::Value::Array(vec!["H10301".into()]));
            r.insert("d0_pin".into(), 6.into());
            r.insert("d1_pin".into(), 13.into());
            t["readers"].as_array_mut().unwrap().push(r.into());
        }
        let m = t["mqtt"].as_table_mut().unwrap();
        m.insert("port".into(), (opts.mqtt_port as i64).into());
        m.insert("backoff_min_ms".into(), 50.into());
        m.insert("backoff_max_ms".into(), 500.into());
        let config = dir.path().join("menshen.toml");
        std::fs::write(&config, toml::to_string(&t).unwrap()).unwrap();
        Gate { dir, config, socket, sim: None, daemon: None }
    }

    /// Change this gate's configuration file.
    pub fn edit_config(&self, f: impl FnOnce(&mut toml::Table)) {
        let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&self.config).unwrap()).unwrap();
        f(&mut t);
        std::fs::write(&self.config, toml::to_string(&t).unwrap()).unwrap();
    }

    /// Turn the face path on: the real ONNX Runtime (installed by the test command) and models
    /// (`MENSHEN_MODELS_DIR` or `../shared/models`), with a file camera playing `camera` at `fps`.
    /// Further changes go through `edit_config`.
    pub fn enable_face(&self, camera: &Path, fps: f64) {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/menshen-runtime/lib/libonnxruntime.so.1.31.1");
        let models = shared_models();
        self.edit_config(|t| {
            let mut face = toml::Table::new();
            face.insert("enabled".into(), true.into());
            face.insert("onnxruntime_library".into(), lib.display().to_string().into());
            face.insert("models_dir".into(), models.display().to_string().into());
            let mut c = toml::Table::new();
            c.insert("kind".into(), "files".into());
            c.insert("dir".into(), camera.display().to_string().into());
            c.insert("fps".into(), fps.into());
            face.insert("camera".into(), c.into());
            t.insert("face".into(), face.into());
        });
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN).args(args).output().unwrap()
    }

    /// `menshen resident ...` on this gate's store.
    pub fn resident(&self, args: &[&str]) -> std::process::Output {
        let mut a = vec!["resident", args[0], "--config", self.config.to_str().unwrap()];
        a.extend_from_slice(&args[1..]);
        self.cli(&a)
    }

    /// `menshen resident list` as id → mode (the store must open).
    pub fn resident_modes(&self) -> std::collections::HashMap<String, String> {
        let out = self.resident(&["list"]);
        assert!(out.status.success(), "the store does not open: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some((f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect()
    }

    pub fn start_sim(&mut self) {
        self.start_sim_args(&[]);
    }

    /// Start the simulated chip with extra `menshen sim serve` arguments.
    pub fn start_sim_args(&mut self, extra: &[&str]) {
        // The simulated chip stands for the reader's hardware, which never pauses in the middle
        // of a frame. A user process can be descheduled: on a busy machine (CI beside a soak and
        // a fuzzer) its timing thread was once held back past the 25 ms frame gap, and the daemon
        // rightly ended a 26-bit frame after 7 bits. So the chip runs under SCHED_FIFO where the
        // machine allows it (root), else at nice -10. (`chrt` and `nice` exec the program, so the
        // pid is the program's.) The daemon runs at nice -10 (`start_daemon`), as a gate
        // controller would.
        let mut args: Vec<&str> = if realtime_allowed() { vec!["chrt", "-f", "20"] } else { vec!["nice", "-n", "-10"] };
        args.extend([BIN, "sim", "serve", "--config", self.config.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let child = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.sim = Some(child);
        let s = self.socket.clone();
        assert!(wait_for(Duration::from_secs(10), || s.exists()), "sim chip did not start");
    }

    pub fn start_daemon(&mut self) {
        self.start_daemon_with_env(&[]);
    }

    /// Start the daemon with these extra environment variables (e.g. LD_PRELOAD for the
    /// simulated V4L2 device).
    pub fn start_daemon_with_env(&mut self, env: &[(&str, String)]) {
        self.start_daemon_bin(Path::new(BIN), env);
    }

    /// Start this daemon binary (e.g. the release build) with these extra environment variables.
    pub fn start_daemon_bin(&mut self, bin: &Path, env: &[(&str, String)]) {
        self.spawn_daemon(bin, env);
        let ok = wait_for(Duration::from_secs(15), || self.status().is_some());
        assert!(ok, "daemon did not come up; log:\n{}", self.log());
    }

    /// Start the daemon and do not wait for it (it may be expected to fail).
    pub fn spawn_daemon(&mut self, bin: &Path, env: &[(&str, String)]) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("daemon.log")).unwrap();
        let child = Command::new("nice")
            .args(["-n", "-10"])
            .arg(bin)
            .args(["run", "--config", self.config.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
    }

    /// Wait for the daemon to exit on its own; its exit status.
    pub fn wait_daemon_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.daemon.take().unwrap();
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "daemon still running after {limit:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The camera state `menshen status` reports ("" before the daemon answers).
    pub fn camera(&self) -> String {
        self.status().map(|s| s["camera"].as_str().unwrap_or("").to_string()).unwrap_or_default()
    }

    /// Wait for a camera state; returns how long it took.
    pub fn wait_camera(&self, state: &str, limit: Duration) -> Duration {
        let t = Instant::now();
        assert!(
            wait_for(limit, || self.camera() == state),
            "camera not `{state}` within {limit:?} (is `{}`); log:\n{}",
            self.camera(),
            self.log()
        );
        t.elapsed()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--config", self.config.to_str().unwrap()]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    pub fn world(&self, op: WorldOp) -> Value {
        sim::request(&self.socket, &op).unwrap_or_else(|e| panic!("sim request failed: {e}"))
    }

    pub fn swipe(&self, facility: u64, card: u64) -> Value {
        self.world(WorldOp::Swipe { reader: "front".into(), facility, card, format: None })
    }

    /// The H10301 frame of a card, as characters.
    pub fn swipe_bits(&self, facility: u64, card: u64) -> Vec<char> {
        menshen::wiegand::encode(menshen::wiegand::Format::H10301, facility, card)
            .unwrap()
            .to_string()
            .chars()
            .collect()
    }

    pub fn state(&self) -> Value {
        self.world(WorldOp::State)
    }

    pub fn relay(&self, door: &str) -> Value {
        self.state()["doors"][door].clone()
    }

    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().unwrap().id()
    }

    /// Send a signal and wait for the daemon to exit; returns its exit status.
    pub fn signal_daemon(&mut self, sig: &str) -> std::process::ExitStatus {
        let mut child = self.daemon.take().unwrap();
        Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "daemon did not exit after SIG{sig}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        for c in [self.daemon.as_mut(), self.sim.as_mut()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Replies as (correlation data, payload).
pub type Replies = Arc<Mutex<Vec<(Option<Vec<u8>>, Value)>>>;

/// A building management system client on MQTT 5: sends commands with a response topic and
/// correlation data, and records every reply and every message under `menshen/v1/#`.
pub struct Bms {
    client: rumqttc::v5::Client,
    pub reply_topic: String,
    pub replies: Replies,
    pub msgs: Arc<Mutex<Vec<(String, Value, bool)>>>,
    next: Mutex<u64>,
    /// Counts replies, so a waiter wakes on the reply itself instead of polling.
    arrived: Arc<(Mutex<u64>, std::sync::Condvar)>,
}

impl Bms {
    pub fn connect(port: u16) -> Bms {
        Bms::connect_with(port, None)
    }

    /// With a client id, the session persists on the broker (clean start off, 1 h expiry), so
    /// nothing is missed while this client or the broker is away.
    pub fn connect_with(port: u16, persistent_id: Option<&str>) -> Bms {
        Bms::connect_full(port, persistent_id, None)
    }

    /// Logged in as `user` (a broker with a password file and an ACL).
    pub fn connect_login(port: u16, user: &str, password: &str) -> Bms {
        Bms::connect_full(port, None, Some((user, password)))
    }

    fn connect_full(port: u16, persistent_id: Option<&str>, login: Option<(&str, &str)>) -> Bms {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::mqttbytes::QoS;
        let id = persistent_id.map_or_else(|| format!("bms-{}", free_port()), str::to_string);
        let mut o = rumqttc::v5::MqttOptions::new(id.clone(), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        // A BMS client should send its small commands without Nagle's delay (docs/mqtt.md).
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        if persistent_id.is_some() {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(3600));
        }
        o.set_max_packet_size(Some(64 << 20));
        let (client, mut conn) = rumqttc::v5::Client::new(o, 10_000);
        let reply_topic = format!("bms/{id}/replies");
        client.subscribe(reply_topic.clone(), QoS::AtLeastOnce).unwrap();
        client.subscribe("menshen/v1/#", QoS::AtLeastOnce).unwrap();
        let replies: Replies = Arc::default();
        let msgs: Arc<Mutex<Vec<(String, Value, bool)>>> = Arc::default();
        let subacks = Arc::new(Mutex::new(0));
        let arrived: Arc<(Mutex<u64>, std::sync::Condvar)> = Arc::default();
        let (r, m, s, rt, a) = (replies.clone(), msgs.clone(), subacks.clone(), reply_topic.clone(), arrived.clone());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => *s.lock().unwrap() += 1,
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).to_string();
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if topic == rt {
                            let corr = p.properties.and_then(|pr| pr.correlation_data).map(|b| b.to_vec());
                            r.lock().unwrap().push((corr, v));
                            *a.0.lock().unwrap() += 1;
                            a.1.notify_all();
                        } else {
                            m.lock().unwrap().push((topic, v, p.retain));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        assert!(wait_for(Duration::from_secs(10), || *subacks.lock().unwrap() >= 2), "BMS never got its SUBACKs");
        Bms { client, reply_topic, replies, msgs, next: Mutex::new(0), arrived }
    }

    /// Publish raw bytes to a topic with MQTT 5 properties.
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        correlation: Option<&[u8]>,
        expiry: Option<u32>,
        retain: bool,
    ) {
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: correlation.map(|c| c.to_vec().into()),
            message_expiry_interval: expiry,
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, retain, payload, props)
            .unwrap();
    }

    /// Publish a command (QoS 1, not retained) answered on `reply_topic` instead of this BMS's own.
    pub fn publish_replying_to(&self, topic: &str, payload: Vec<u8>, correlation: &[u8], reply_topic: &str) {
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        let props = PublishProperties {
            response_topic: Some(reply_topic.to_string()),
            correlation_data: Some(correlation.to_vec().into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload, props)
            .unwrap();
    }

    /// A fresh correlation id.
    pub fn corr(&self) -> String {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        format!("req-{}-{}", std::process::id(), *n)
    }

    /// The reply with this correlation data, waiting up to 10 s.
    pub fn reply_for(&self, corr: &[u8]) -> Option<Value> {
        self.reply_within(corr, Duration::from_secs(10))
    }

    /// The reply with this correlation data, waiting up to `timeout` (woken by each reply).
    pub fn reply_within(&self, corr: &[u8], timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        let (count, cv) = &*self.arrived;
        let mut seen = count.lock().unwrap();
        loop {
            let found =
                self.replies.lock().unwrap().iter().find(|(c, _)| c.as_deref() == Some(corr)).map(|(_, v)| v.clone());
            if found.is_some() {
                return found;
            }
            let now = Instant::now();
            if now >= end {
                return None;
            }
            seen = cv.wait_timeout(seen, end - now).unwrap().0;
        }
    }

    /// Send a command to a gate (`menshen/v1/{site}/{gate}/cmd/{verb}`) and wait for its reply.
    pub fn command(&self, site: &str, gate: &str, verb: &str, payload: Value, expiry: Option<u32>) -> Value {
        let corr = self.corr();
        let topic = format!("menshen/v1/{site}/{gate}/cmd/{verb}");
        self.publish(&topic, payload.to_string().into_bytes(), Some(corr.as_bytes()), expiry, false);
        self.reply_for(corr.as_bytes()).unwrap_or_else(|| panic!("no reply to {verb} {payload}"))
    }

    /// Every event message received so far (re-sends included).
    pub fn events(&self) -> Vec<Value> {
        self.msgs.lock().unwrap().iter().filter(|(t, _, _)| t.contains("/event/")).map(|(_, v, _)| v.clone()).collect()
    }

    /// Wait until every event with seq 1..=last has arrived.
    pub fn all_events_arrived(&self, last: u64, timeout: Duration) -> bool {
        wait_for(timeout, || {
            let seen: std::collections::HashSet<u64> = self.events().iter().filter_map(|v| v["seq"].as_u64()).collect();
            (1..=last).all(|s| seen.contains(&s))
        })
    }

    pub fn messages(&self, suffix: &str) -> Vec<Value> {
        self.msgs.lock().unwrap().iter().filter(|(t, _, _)| t.ends_with(suffix)).map(|(_, v, _)| v.clone()).collect()
    }

    pub fn retained(&self, suffix: &str) -> Vec<Value> {
        self.msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, r)| *r && t.ends_with(suffix))
            .map(|(_, v, _)| v.clone())
            .collect()
    }
}

impl Drop for Bms {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

impl Gate {
    /// The roster fingerprint from `menshen status`.
    pub fn fingerprint(&self) -> String {
        self.status().expect("status")["roster_fingerprint"].as_str().unwrap().to_string()
    }

    pub fn relay_writes(&self, door: &str) -> u64 {
        self.relay(door)["relay_writes"].as_u64().unwrap()
    }
}
