//! Part 2 of the real-kernel test (`tests/real-kernel/run.sh`), run inside the guest after
//! `vfio-kernel-check`: one VM's two mtty devices (a 1-port and a 2-port one) migrate
//! between two `vfio-migd` daemons over loopback, through the real VFIO migration uAPI.
//!
//! This program plays two roles, as in a real deployment:
//! - **the VMM** of the VM on each host: it opens the source devices through the legacy
//!   group/container path (both groups in one container, as QEMU does; the destination's
//!   in another), writes guest-visible UART state through the BARs, hands each device fd
//!   to its host's daemon over the handoff socket and keeps its own copy open throughout;
//!   afterwards it reads the devices back through the BARs;
//! - **the operator**, who drives the daemons with `vfio-migctl` only (`incoming` on the
//!   destination, `migrate` on the source), reading its `--json` output.
//!
//! Scenario: two runs with the daemon's test-only stream fault switch (a corrupted and a
//! truncated stream) must each be rejected by the destination while receiving, before any
//! device is asked to leave RESUMING, leave the source RUNNING with its state and the
//! destination reset; then a clean run must move every register and FIFO byte. The switch
//! is daemon configuration, so each run gets a fresh source daemon (and a fresh handoff of
//! the same fds); the destination daemon serves all three.
//!
//! Usage: `mtty-vmm TYPE:UUID...`, per type a source then a destination mdev, e.g.
//! `mtty-1:SRC mtty-1:DST mtty-2:SRC mtty-2:DST`. `vfio-migd` and `vfio-migctl` are taken
//! from `PATH`; work files go to `$MTTY_VMM_WORK` (default `/tmp/mtty-vmm`). Prints one
//! `ok NAME` / `FAIL NAME: WHY` line per check and a final `N passed, M failed` line.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use vfio_migctl::handoff::hand_over;
use vfio_migd::device::DeviceIdentity;
use vfio_migd::device::vfio::sysfs_identity;
use vfio_migd::fsm::{Caps, State};
use vfio_migd::vfio::{OpenPath, VfioDeviceFd, VfioHost};
use vfio_migd_tests::free_port;
use vfio_migd_tests::mtty::{
    self, LSR_TX_IDLE, MdevsByType, MttyType, PortScript, UartView, VM_SCRIPTS, reg,
};
use vfio_migd_tests::report::{Report, ensure};

/// The VM's group, on both daemons.
const GROUP: &str = "vm1";
/// Per-phase timeout given to `vfio-migctl migrate`; TCG is slow, but a phase of these
/// tiny streams takes well under a second.
const PHASE_TIMEOUT_MS: &str = "60000";
/// How long a daemon may take to start serving (TCG, first page-ins of a large binary).
const DAEMON_READY: Duration = Duration::from_secs(120);
/// How long a daemon may take to stop after SIGTERM.
const DAEMON_STOP: Duration = Duration::from_secs(60);
/// How long a finished job may take to show as finished on the other daemon.
const JOB_SETTLE: Duration = Duration::from_secs(120);
/// Ceiling on a local save of an mtty device (its images are under 100 bytes).
const MAX_STREAM: usize = 4096;

fn show(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// One device of the VM, through the VMM's own fd.
struct VmDevice {
    /// The name the daemon knows it by.
    name: String,
    mtty: MttyType,
    identity: DeviceIdentity,
    handle: VfioDeviceFd,
    /// One per port: what the source was programmed with, what the destination must hold.
    scripts: &'static [PortScript],
}

impl VmDevice {
    fn register(&self, port: usize, offset: u64) -> Result<u8, String> {
        let mut byte = [0u8];
        self.handle.bar_read(port as u32, offset, &mut byte).map_err(show)?;
        Ok(byte[0])
    }

    fn write_registers(&self, port: usize, writes: &[(u64, u8)]) -> Result<(), String> {
        for &(offset, value) in writes {
            self.handle.bar_write(port as u32, offset, &[value]).map_err(show)?;
        }
        Ok(())
    }

    fn view(&self, port: usize) -> Result<UartView, String> {
        let mut values = [0u8; 5];
        for (value, offset) in values.iter_mut().zip(UartView::REGISTERS) {
            *value = self.register(port, offset)?;
        }
        Ok(UartView::from_registers(values))
    }

    fn views(&self) -> Result<Vec<UartView>, String> {
        (0..self.mtty.ports()).map(|port| self.view(port)).collect()
    }

    fn state(&self) -> Result<State, String> {
        self.handle.state().map_err(show)
    }

    /// Reads RX until LSR says the FIFO is empty (mtty's FIFO holds 16 bytes).
    fn drain_fifo(&self, port: usize) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        while self.register(port, reg::LSR)? & mtty::LSR_DATA_READY != 0 {
            if bytes.len() > 16 {
                return Err(format!("port {port}: LSR still says data ready after {} reads", bytes.len()));
            }
            bytes.push(self.register(port, reg::DATA)?);
        }
        Ok(bytes)
    }

    /// Every port's registers and FIFO as `scripts` left them; the FIFO is drained to be
    /// read and, with `refill`, pushed back so the device holds the same state afterwards.
    fn check_scripted_state(&self, refill: bool) -> Result<(), String> {
        for (port, script) in self.scripts.iter().enumerate() {
            let at = |what: String| format!("{} port {port}: {what}", self.name);
            self.view(port)?.compare(&UartView::after(script)).map_err(at)?;
            let fifo = self.drain_fifo(port)?;
            ensure(fifo == script.fifo, || {
                at(format!("RX gave {fifo:02x?}, expected {:02x?}", script.fifo))
            })?;
            let lsr = self.register(port, reg::LSR)?;
            ensure(lsr == LSR_TX_IDLE, || {
                at(format!("LSR {lsr:#04x} once drained, expected {LSR_TX_IDLE:#04x}"))
            })?;
            if refill {
                self.write_registers(port, &script.fifo_writes())?;
                self.view(port)?
                    .compare(&UartView::after(script))
                    .map_err(|e| at(format!("after refilling: {e}")))?;
            }
        }
        Ok(())
    }

    /// A save of this device (STOP → STOP_COPY, read to the end, back to RUNNING), checked
    /// against the scripts: the divisor latch is only visible there, because setting
    /// LCR.DLAB to read it through the BAR clears it in mtty.
    fn check_saved_image(&self) -> Result<(), String> {
        self.handle.set_state(State::Stop).map_err(show)?;
        let data_fd = self
            .handle
            .set_state(State::StopCopy)
            .map_err(show)?
            .ok_or_else(|| "STOP -> STOP_COPY opened no data_fd".to_string())?;
        let mut image = Vec::new();
        let mut chunk = [0u8; 256];
        loop {
            match data_fd.read_chunk(&mut chunk) {
                Ok(0) => break,
                Ok(n) => image.extend_from_slice(&chunk[..n]),
                Err(errno) => return Err(format!("read after {} bytes: {errno}", image.len())),
            }
            ensure(image.len() <= MAX_STREAM, || format!("more than {MAX_STREAM} bytes and no end"))?;
        }
        drop(data_fd);
        self.handle.set_state(State::Stop).map_err(show)?;
        self.handle.set_state(State::Running).map_err(show)?;
        ensure(image.len() == self.mtty.image_len(), || {
            format!("{} bytes saved, expected {}", image.len(), self.mtty.image_len())
        })?;
        mtty::check_header(&image, self.mtty)?;
        for (port, script) in self.scripts.iter().enumerate() {
            script.check_record(&image, port)?;
        }
        Ok(())
    }
}

/// One VM's devices, as its VMM holds them: every group in one container.
struct Vm {
    devices: Vec<VmDevice>,
}

impl Vm {
    /// Opens `devices` (type, mdev UUID, daemon name, port scripts) through one container.
    fn open(label: &str, devices: &[(MttyType, &str, String, &'static [PortScript])]) -> Result<Vm, String> {
        let host = VfioHost::system();
        let mut container = host.open_container(label).map_err(show)?;
        let mut opened = Vec::new();
        for (mtty, uuid, name, scripts) in devices {
            let identity = sysfs_identity(host.sysfs(), uuid).map_err(show)?;
            let want = DeviceIdentity { driver: "mtty".into(), model: mtty.sysfs_name().into() };
            ensure(identity == want, || format!("{uuid}: sysfs identity {identity}, expected {want}"))?;
            let group = host.sysfs().iommu_group(uuid).map_err(show)?;
            let handle = container.open_device(group, uuid).map_err(show)?;
            ensure(handle.open_path() == OpenPath::Group { group }, || {
                format!("{uuid} opened via {:?}", handle.open_path())
            })?;
            let caps = handle.migration_caps().map_err(show)?;
            let want_caps = Caps::STOP_COPY.union(Caps::P2P).union(Caps::PRE_COPY);
            ensure(caps == want_caps, || format!("{uuid}: caps {caps}, expected {want_caps}"))?;
            opened.push(VmDevice {
                name: name.clone(),
                mtty: *mtty,
                identity,
                handle,
                scripts: &scripts[..mtty.ports()],
            });
        }
        // The container fd stays open inside every device handle.
        Ok(Vm { devices: opened })
    }

    fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }

    fn expect_states(&self, want: State) -> Result<(), String> {
        for device in &self.devices {
            let got = device.state()?;
            ensure(got == want, || format!("{} is {got}, expected {want}", device.name))?;
        }
        Ok(())
    }

    /// The guest writes its UART state: divisor, line control, FIFO on, interrupts,
    /// modem control, scratch, then bytes into the loop-back FIFO.
    fn program(&self) -> Result<(), String> {
        for device in &self.devices {
            for (port, script) in device.scripts.iter().enumerate() {
                device.write_registers(port, &script.writes())?;
                device
                    .view(port)?
                    .compare(&UartView::after(script))
                    .map_err(|e| format!("{} port {port} right after programming: {e}", device.name))?;
            }
        }
        Ok(())
    }

    fn views(&self) -> Result<Vec<Vec<UartView>>, String> {
        self.devices.iter().map(VmDevice::views).collect()
    }

    /// Hands every device fd to `daemon` (joining [`GROUP`]), keeping the VMM's copy.
    fn hand_over(&self, daemon: &Daemon) -> Result<(), String> {
        for device in &self.devices {
            let request = json!({
                "name": device.name,
                "group": GROUP,
                "identity": { "driver": device.identity.driver, "model": device.identity.model },
            });
            let reply = hand_over(&daemon.handoff, &request, device.handle.as_fd())
                .map_err(|e| format!("{}: handoff to {}: {e}", device.name, daemon.name))?;
            ensure(reply.ok, || {
                format!("{}: refused: {}", device.name, reply.error.clone().unwrap_or_default())
            })?;
            let described = reply.device.unwrap_or_default();
            ensure(
                described.contains("caps=STOP_COPY|P2P|PRE_COPY") && described.contains("state=RUNNING"),
                || format!("{}: the daemon describes it as `{described}`", device.name),
            )?;
        }
        let group = daemon.migctl(&["groups", "show", GROUP])?.success()?;
        ensure(group["devices"] == json!(self.names()), || {
            format!("group {GROUP} on {}: {group}", daemon.name)
        })?;
        let listed = daemon.devices()?;
        for device in &self.devices {
            let entry = listed.get(&device.name).ok_or_else(|| format!("{} not listed", device.name))?;
            let want = json!({ "driver": device.identity.driver, "model": device.identity.model });
            ensure(entry["backend"] == "handoff" && entry["identity"] == want, || {
                format!("{} listed as {entry}", device.name)
            })?;
        }
        Ok(())
    }
}

/// What `vfio-migctl --json` printed and how it exited.
struct MigctlRun {
    code: i32,
    json: Value,
    stderr: String,
}

impl MigctlRun {
    fn success(self) -> Result<Value, String> {
        ensure(self.code == 0, || format!("exit {}: {}", self.code, self.stderr.trim()))?;
        Ok(self.json)
    }
}

/// One `vfio-migd` process with its own sockets, state directory and log.
struct Daemon {
    name: String,
    control: PathBuf,
    handoff: PathBuf,
    peer: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon whose configuration adds `extra` (e.g. a `[test.stream_fault]`
    /// table, which needs `--allow-test-faults`) and waits until it serves.
    fn start(work: &Path, name: &str, extra: &str) -> Result<Daemon, String> {
        let home = work.join(name);
        fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
        let control = home.join("control.sock");
        let handoff = home.join("handoff.sock");
        // The guest has no resolver configuration (no /etc/hosts, no NSS modules): IP literals only.
        let peer = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "state_dir = \"{state}\"\n[control]\nsocket = \"{control}\"\n[handoff]\nsocket = \"{handoff}\"\n\
             [peer]\nlisten = \"{peer}\"\n{extra}",
            state = home.join("state").display(),
            control = control.display(),
            handoff = handoff.display(),
        );
        let config_path = home.join("config.toml");
        fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
        let log = home.join("daemon.log");
        let log_file = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = Command::new("vfio-migd");
        command.arg("--config").arg(&config_path).env("VFIO_MIGD_LOG", "info,vfio_migd=debug");
        if extra.contains("[test") {
            command.arg("--allow-test-faults");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(show)?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn vfio-migd: {e}"))?;
        let mut daemon = Daemon { name: name.to_string(), control, handoff, peer, log, child: Some(child) };
        daemon.wait_serving()?;
        Ok(daemon)
    }

    fn wait_serving(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DAEMON_READY;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("{} exited while starting ({status})", self.name));
            }
            if self.control.exists() && self.migctl(&["health"]).is_ok_and(|run| run.code == 0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{} not serving after {DAEMON_READY:?}", self.name));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `vfio-migctl --socket CONTROL --json ARGS...`.
    fn migctl(&self, args: &[&str]) -> Result<MigctlRun, String> {
        let output = Command::new("vfio-migctl")
            .arg("--socket")
            .arg(&self.control)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run vfio-migctl: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .map_err(|e| format!("vfio-migctl {args:?} printed `{stdout}`: {e}"))?
        };
        Ok(MigctlRun {
            code: output.status.code().unwrap_or(-1),
            json,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// `devices list`, by name.
    fn devices(&self) -> Result<BTreeMap<String, Value>, String> {
        let listed = self.migctl(&["devices", "list"])?.success()?;
        let entries = listed.as_array().ok_or_else(|| format!("devices list printed {listed}"))?;
        Ok(entries.iter().map(|d| (d["name"].as_str().unwrap_or_default().to_string(), d.clone())).collect())
    }

    /// The daemon's own view of `names`: each in `state` and held by no job.
    fn expect_devices(&self, names: &[String], state: State) -> Result<(), String> {
        let listed = self.devices()?;
        for name in names {
            let entry = listed.get(name).ok_or_else(|| format!("{} does not list {name}", self.name))?;
            ensure(entry["state"] == state.to_string() && entry["job_id"] == "", || {
                format!("{} lists {name} as {entry}", self.name)
            })?;
        }
        Ok(())
    }

    /// `jobs show JOB` once the job has finished here.
    fn finished_job(&self, job: &str) -> Result<Value, String> {
        let deadline = Instant::now() + JOB_SETTLE;
        loop {
            let shown = self.migctl(&["jobs", "show", job])?.success()?;
            if shown["status"] != "running" {
                return Ok(shown);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "job {job} still running on {} after {JOB_SETTLE:?}: {shown}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status of a clean stop.
    fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let pid = Pid::from_raw(child.id() as i32);
        kill(pid, Signal::SIGTERM).map_err(|e| format!("SIGTERM {}: {e}", self.name))?;
        let deadline = Instant::now() + DAEMON_STOP;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("{} stopped with {status}", self.name)),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("{} still running {DAEMON_STOP:?} after SIGTERM", self.name));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("wait for {}: {e}", self.name)),
            }
        }
    }

    /// The end of the daemon's log, for a failure report.
    fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A migration of the VM's group driven the way an operator does it.
struct Migration<'a> {
    job: &'a str,
    source: &'a Daemon,
    destination: &'a Daemon,
    source_vm: &'a Vm,
    destination_vm: &'a Vm,
}

impl Migration<'_> {
    /// `vfio-migctl incoming` on the destination, `vfio-migctl migrate` on the source
    /// (which follows the job to its end); the source's final job and its exit code.
    fn run(&self) -> Result<(i32, Value), String> {
        let mut incoming = vec!["incoming", "--job-id", self.job];
        let destination_names = self.destination_vm.names();
        incoming.extend(destination_names.iter().map(String::as_str));
        let prepared = self.destination.migctl(&incoming)?.success()?;
        ensure(prepared["status"] == "running", || format!("incoming: {prepared}"))?;

        let maps: Vec<String> = self
            .source_vm
            .names()
            .iter()
            .zip(&destination_names)
            .map(|(source, destination)| format!("{source}={destination}"))
            .collect();
        let mut migrate = vec![
            "migrate",
            "--job-id",
            self.job,
            "--group",
            GROUP,
            "--peer",
            &self.destination.peer,
            "--timeout-ms",
            PHASE_TIMEOUT_MS,
        ];
        for map in &maps {
            migrate.extend(["--map", map.as_str()]);
        }
        let run = self.source.migctl(&migrate)?;
        ensure(run.json.is_object(), || format!("migrate exit {}: {}", run.code, run.stderr.trim()))?;
        Ok((run.code, run.json))
    }
}

fn phases(job: &Value) -> Vec<String> {
    job["phases"]
        .as_array()
        .map(|phases| phases.iter().filter_map(|p| p["phase"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// One run with the stream fault switch armed on the source daemon.
struct FaultCase {
    tag: &'static str,
    job: &'static str,
    /// The `[test.stream_fault]` table: device 0 is the 1-port device, device 1 the 2-port
    /// one (group order). Frame 0 of a device is its PRE_COPY header, frame 1 its ports.
    fault: &'static str,
    /// What the destination's error must say (its own detection).
    destination_error: &'static [&'static str],
}

const FAULT_CASES: [FaultCase; 2] = [
    FaultCase {
        tag: "corrupted stream",
        job: "corrupted",
        fault: "[test.stream_fault]\nkind = \"flip_byte\"\ndevice = 1\nframe = 1\n",
        destination_error: &["phase receiving", "device 1 frame 1: checksum mismatch"],
    },
    FaultCase {
        tag: "truncated stream",
        job: "truncated",
        fault: "[test.stream_fault]\nkind = \"truncate\"\ndevice = 0\nframe = 1\n",
        // Connection 0 ends inside frame 1 of device 0; the source's abort then closes
        // connection 1, whose end the destination may see first.
        destination_error: &["phase receiving: data connection ", " ended "],
    },
];

struct Guest {
    work: PathBuf,
    source_vm: Vm,
    destination_vm: Vm,
    /// The destination's registers before anything was migrated, per device and port.
    power_on: Vec<Vec<UartView>>,
}

impl Guest {
    /// Source daemon: started, given the VM's devices by the VMM.
    fn start_source(&self, report: &mut Report, tag: &str, name: &str, fault: &str) -> Option<Daemon> {
        let armed = if fault.is_empty() { "no fault switch" } else { "the stream fault switch armed" };
        let source = report.step(
            &format!("{tag}: source vfio-migd serving, {armed}"),
            Daemon::start(&self.work, name, fault),
        )?;
        report
            .step(
                &format!("{tag}: VMM hands the source devices to the source daemon (group {GROUP})"),
                self.source_vm.hand_over(&source),
            )
            .map(|()| source)
    }

    /// A fresh source daemon (with `fault` in its configuration) migrating the VM to
    /// `destination` as job `job`: the source, `vfio-migctl migrate`'s exit code and job.
    fn migrate(
        &self,
        report: &mut Report,
        tag: &str,
        name: &str,
        fault: &str,
        job: &str,
        destination: &Daemon,
    ) -> Option<(Daemon, i32, Value)> {
        let source = self.start_source(report, tag, name, fault)?;
        let migration = Migration {
            job,
            source: &source,
            destination,
            source_vm: &self.source_vm,
            destination_vm: &self.destination_vm,
        };
        let (code, job) = report.step(&format!("{tag}: vfio-migctl incoming + migrate"), migration.run())?;
        Some((source, code, job))
    }

    fn fault_case(&self, report: &mut Report, case: &FaultCase, destination: &Daemon) -> bool {
        let tag = case.tag;
        let name = format!("source-{}", case.job);
        let Some((mut source, code, job)) =
            self.migrate(report, tag, &name, case.fault, case.job, destination)
        else {
            return false;
        };
        println!("# {tag}: source job error: {}", job["error"]);
        let mut passed = report.check(&format!("{tag}: migrate exits 3, job rolled back"), {
            ensure(code == 3 && job["status"] == "rolled_back", || {
                format!("exit {code}, status {}, error {}", job["status"], job["error"])
            })
        });
        passed &= report.check(
            &format!("{tag}: destination rejected the stream while receiving, never RESUMING -> STOP"),
            destination.finished_job(case.job).and_then(|job| {
                println!("# {tag}: destination job error: {}", job["error"]);
                let error = job["error"].as_str().unwrap_or_default();
                let seen = phases(&job);
                ensure(job["status"] == "rolled_back", || format!("status {}: {error}", job["status"]))?;
                ensure(seen.iter().any(|p| p == "receiving") && seen.iter().any(|p| p == "reset"), || {
                    format!("phases {seen:?}")
                })?;
                // RESUMING -> STOP is the loading phase: a rejected stream never gets there.
                ensure(!seen.iter().any(|p| p == "loading" || p == "loaded"), || {
                    format!("the destination loaded: phases {seen:?}")
                })?;
                let missing: Vec<_> = case.destination_error.iter().filter(|w| !error.contains(*w)).collect();
                ensure(missing.is_empty(), || format!("error `{error}` does not say {missing:?}"))
            }),
        );
        passed &= report.check(&format!("{tag}: source devices RUNNING again (VMM and daemon agree)"), {
            self.source_vm
                .expect_states(State::Running)
                .and_then(|()| source.expect_devices(&self.source_vm.names(), State::Running))
        });
        passed &= report.check(
            &format!(
                "{tag}: source UART state intact through the BARs (registers, FIFO drained and refilled)"
            ),
            self.source_vm.devices.iter().try_for_each(|d| d.check_scripted_state(true)),
        );
        passed &= report.check(
            &format!("{tag}: destination devices reset: RUNNING, registers as at power-on, FIFO empty"),
            self.destination_unchanged()
                .and_then(|()| destination.expect_devices(&self.destination_vm.names(), State::Running)),
        );
        passed &= report.check(&format!("{tag}: source vfio-migd stops cleanly on SIGTERM"), source.stop());
        if !passed {
            dump_log(&source);
        }
        passed
    }

    /// The destination shows nothing of the VM: RUNNING, registers as at power-on.
    fn destination_unchanged(&self) -> Result<(), String> {
        self.destination_vm.expect_states(State::Running)?;
        let now = self.destination_vm.views()?;
        for ((device, views), before) in self.destination_vm.devices.iter().zip(&now).zip(&self.power_on) {
            for (port, (view, before)) in views.iter().zip(before).enumerate() {
                view.compare(before).map_err(|e| format!("{} port {port}: {e}", device.name))?;
            }
        }
        Ok(())
    }

    fn successful_migration(&self, report: &mut Report, destination: &mut Daemon) -> bool {
        let tag = "migration";
        let job_id = "vm1-move";
        let Some((mut source, code, job)) = self.migrate(report, tag, "source", "", job_id, destination)
        else {
            return false;
        };
        let total: usize = self.source_vm.devices.iter().map(|d| d.mtty.image_len()).sum();
        let mut passed =
            report.check(&format!("{tag}: migrate exits 0, job succeeded, {total} bytes moved"), {
                ensure(code == 0 && job["status"] == "succeeded", || {
                    format!("exit {code}, status {}, error {}", job["status"], job["error"])
                })
                .and_then(|()| {
                    ensure(
                        job["bytes_done"] == total && job["downtime_ns"].as_u64().is_some_and(|ns| ns > 0),
                        || format!("bytes_done {}, downtime_ns {}", job["bytes_done"], job["downtime_ns"]),
                    )
                })
            });
        passed &= report.check(&format!("{tag}: destination loaded and resumed the group"), {
            destination.finished_job(job_id).and_then(|job| {
                let seen = phases(&job);
                ensure(job["status"] == "succeeded", || {
                    format!("status {}: {}", job["status"], job["error"])
                })?;
                ensure(
                    ["receiving", "loading", "loaded", "resume"].iter().all(|p| seen.iter().any(|s| s == p)),
                    || format!("phases {seen:?}"),
                )
            })
        });
        passed &= report.check(&format!("{tag}: source devices STOP after commit (VMM and daemon agree)"), {
            self.source_vm
                .expect_states(State::Stop)
                .and_then(|()| source.expect_devices(&self.source_vm.names(), State::Stop))
        });
        passed &= report.check(&format!("{tag}: destination devices RUNNING (VMM and daemon agree)"), {
            self.destination_vm
                .expect_states(State::Running)
                .and_then(|()| destination.expect_devices(&self.destination_vm.names(), State::Running))
        });
        passed &= report.check(
            &format!("{tag}: destination registers read through the BARs equal the source's"),
            self.destination_vm.devices.iter().try_for_each(|device| {
                device.scripts.iter().enumerate().try_for_each(|(port, script)| {
                    device
                        .view(port)?
                        .compare(&UartView::after(script))
                        .map_err(|e| format!("{} port {port}: {e}", device.name))
                })
            }),
        );
        passed &= report.check(&format!("{tag}: source vfio-migd stops cleanly on SIGTERM"), source.stop());
        passed &= report
            .check(&format!("{tag}: destination vfio-migd stops cleanly on SIGTERM"), destination.stop());
        if !passed {
            dump_log(&source);
        }
        // With both daemons gone the VMM may drive its devices' FSM again.
        passed &= report.check(
            &format!("{tag}: a save of each destination device carries the registers, FIFO and divisor"),
            self.destination_vm
                .devices
                .iter()
                .try_for_each(|d| d.check_saved_image().map_err(|e| format!("{}: {e}", d.name))),
        );
        passed &= report.check(
            &format!("{tag}: destination FIFOs drained through the BARs hold the source's bytes"),
            self.destination_vm.devices.iter().try_for_each(|d| d.check_scripted_state(false)),
        );
        passed
    }
}

fn dump_log(daemon: &Daemon) {
    println!("# ---- {} log tail ({})", daemon.name, daemon.log.display());
    for line in daemon.log_tail(40).lines() {
        println!("# {line}");
    }
}

/// Source and destination mdev of each type, in argument order.
fn parse_args() -> Result<MdevsByType, String> {
    let by_type = mtty::mdevs_by_type(std::env::args().skip(1))?;
    for mtty in [MttyType::OnePort, MttyType::TwoPorts] {
        let given = by_type.get(mtty.sysfs_name()).map_or(0, |(_, uuids)| uuids.len());
        ensure(given == 2, || {
            format!("{} needs a source and a destination mdev, {given} given", mtty.sysfs_name())
        })?;
    }
    Ok(by_type)
}

fn run(report: &mut Report, by_type: &MdevsByType) {
    let work =
        std::env::var_os("MTTY_VMM_WORK").map_or_else(|| PathBuf::from("/tmp/mtty-vmm"), PathBuf::from);
    let _ = fs::remove_dir_all(&work);
    if !report
        .check("work directory", fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display())))
    {
        return;
    }
    // Device 0 of the group is the 1-port device, device 1 the 2-port one.
    let role = |index: usize, prefix: &str| -> Vec<(MttyType, &str, String, &'static [PortScript])> {
        [MttyType::OnePort, MttyType::TwoPorts]
            .iter()
            .enumerate()
            .map(|(device, mtty)| {
                let uuid = by_type[mtty.sysfs_name()].1[index].as_str();
                (*mtty, uuid, format!("{prefix}uart{}", device + 1), &VM_SCRIPTS[device][..])
            })
            .collect()
    };
    let Some(source_vm) = report.step(
        "VMM opens the source devices: both groups in one container",
        Vm::open("source VM", &role(0, "")),
    ) else {
        return;
    };
    let Some(destination_vm) = report.step(
        "VMM opens the destination devices: both groups in another container",
        Vm::open("destination VM", &role(1, "dst-")),
    ) else {
        return;
    };
    report.check("every device starts RUNNING", {
        source_vm.expect_states(State::Running).and_then(|()| destination_vm.expect_states(State::Running))
    });
    let Some(power_on) = report.step("destination power-on registers read through the BARs", {
        destination_vm.views().and_then(|views| {
            for (device, device_views) in destination_vm.devices.iter().zip(&views) {
                for (port, (view, script)) in device_views.iter().zip(device.scripts).enumerate() {
                    ensure(!view.shows_any_of(script), || {
                        format!("{} port {port} already shows the VM's state: {view:?}", device.name)
                    })?;
                }
            }
            Ok(views)
        })
    }) else {
        return;
    };
    if !report.check(
        "VMM programs the source UARTs through the BARs (divisor, LCR, FIFO, IER, MCR, SCR, FIFO bytes)",
        source_vm.program(),
    ) {
        return;
    }
    let guest = Guest { work: work.clone(), source_vm, destination_vm, power_on };

    let Some(mut destination) =
        report.step("destination vfio-migd serving", Daemon::start(&guest.work, "destination", ""))
    else {
        return;
    };
    if !report.check(
        &format!("VMM hands the destination devices to the destination daemon (group {GROUP})"),
        guest.destination_vm.hand_over(&destination),
    ) {
        return;
    }
    let mut passed = true;
    for case in &FAULT_CASES {
        passed &= guest.fault_case(report, case, &destination);
    }
    passed &= guest.successful_migration(report, &mut destination);
    if !passed {
        dump_log(&destination);
    }
}

fn main() -> ExitCode {
    let mut report = Report::default();
    if let Some(by_type) = report.step("arguments", parse_args()) {
        run(&mut report, &by_type);
    }
    println!("{}", report.summary());
    if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
