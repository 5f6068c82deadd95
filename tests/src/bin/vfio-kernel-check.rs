//! Runs inside the real-kernel test guest (`tests/real-kernel/run.sh`): checks the mtty
//! mdevs the guest's /init created. Prints one `ok NAME` / `FAIL NAME: WHY` line per check
//! and a final `N passed, M failed` line; exits non-zero when a check failed.
//!
//! Usage: `vfio-kernel-check TYPE:UUID...` (e.g. `mtty-1:83b8…`).

use std::fs;
use std::path::Path;
use std::process::ExitCode;

/// The running tally; every check prints its own line as it completes.
#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, outcome: Result<(), String>) -> bool {
        match outcome {
            Ok(()) => {
                self.passed += 1;
                println!("ok {name}");
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("FAIL {name}: {why}");
                false
            }
        }
    }
}

/// One mdev the guest's /init created.
struct Mdev {
    mdev_type: String,
    uuid: String,
}

fn parse_args() -> Result<Vec<Mdev>, String> {
    let mdevs: Vec<Mdev> = std::env::args()
        .skip(1)
        .map(|arg| match arg.split_once(':') {
            Some((mdev_type, uuid)) => Ok(Mdev { mdev_type: mdev_type.to_string(), uuid: uuid.to_string() }),
            None => Err(format!("argument `{arg}` is not TYPE:UUID")),
        })
        .collect::<Result<_, _>>()?;
    if mdevs.is_empty() {
        return Err("no TYPE:UUID arguments".to_string());
    }
    Ok(mdevs)
}

/// The last path component a sysfs symlink points to.
fn link_name(link: &Path) -> Result<String, String> {
    let target = fs::read_link(link).map_err(|e| format!("readlink {}: {e}", link.display()))?;
    target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} points to {}", link.display(), target.display()))
}

/// The mdev's IOMMU group number, from `/sys/bus/mdev/devices/<uuid>/iommu_group`.
fn iommu_group(mdev: &Mdev) -> Result<u32, String> {
    let link = Path::new("/sys/bus/mdev/devices").join(&mdev.uuid).join("iommu_group");
    let name = link_name(&link)?;
    name.parse().map_err(|_| format!("IOMMU group `{name}` is not a number"))
}

fn check_mdev(report: &mut Report, mdev: &Mdev) {
    let sysfs = Path::new("/sys/bus/mdev/devices").join(&mdev.uuid);
    let tag = format!("{}/{}", mdev.mdev_type, mdev.uuid);
    report.check(
        &format!("{tag}: mdev type"),
        link_name(&sysfs.join("mdev_type")).and_then(|found| {
            if found == mdev.mdev_type { Ok(()) } else { Err(format!("sysfs says {found}")) }
        }),
    );
    report.check(
        &format!("{tag}: group node"),
        iommu_group(mdev).and_then(|group| {
            let node = format!("/dev/vfio/{group}");
            if Path::new(&node).exists() { Ok(()) } else { Err(format!("{node} does not exist")) }
        }),
    );
}

fn main() -> ExitCode {
    let mut report = Report::default();
    let mdevs = match parse_args() {
        Ok(mdevs) => mdevs,
        Err(why) => {
            report.check("arguments", Err(why));
            println!("{} passed, {} failed", report.passed, report.failed);
            return ExitCode::FAILURE;
        }
    };
    report.check(
        "container node",
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map(drop)
            .map_err(|e| format!("open /dev/vfio/vfio: {e}")),
    );
    for mdev in &mdevs {
        check_mdev(&mut report, mdev);
    }
    println!("{} passed, {} failed", report.passed, report.failed);
    if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
