//! Following a job until it ends: progress bars on a terminal (one per device and one for
//! the group: bytes, rate, ETA, phase; a device's dirty tracking source and pages when its
//! group is tracked), one line per phase change otherwise, nothing with `--json` (the
//! caller prints the final job, dirty statistics included).

use std::collections::BTreeMap;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::Status;
use tonic::transport::Channel;
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::control_client::ControlClient;

use crate::render::status_name;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    Bars,
    Lines,
    Quiet,
}

/// Whether a job needs nothing more from the watcher: finished, or in doubt (it then
/// waits for an operator's `resolve`, which a watcher cannot give).
pub fn settled(job: &pb::Job) -> bool {
    !matches!(job.status(), pb::JobStatus::Running | pb::JobStatus::Unspecified)
}

/// Streams `job_id`'s snapshots until the job is settled; returns the last one.
pub async fn follow(
    client: &mut ControlClient<Channel>,
    job_id: &str,
    display: Display,
) -> Result<pb::Job, Status> {
    let mut stream = client.watch_job(pb::WatchJobRequest { job_id: job_id.to_string() }).await?.into_inner();
    let mut view = View::new(display);
    let mut last = None;
    while let Some(job) = stream.message().await? {
        view.show(&job);
        let done = settled(&job);
        last = Some(job);
        if done {
            break;
        }
    }
    view.finish();
    last.ok_or_else(|| {
        Status::unavailable(format!("the daemon ended the watch of `{job_id}` without a snapshot"))
    })
}

struct View {
    display: Display,
    bars: Option<Bars>,
    phase: String,
}

struct Bars {
    /// The bars draw through it; it must outlive them.
    _multi: MultiProgress,
    group: ProgressBar,
    devices: BTreeMap<String, ProgressBar>,
}

impl View {
    fn new(display: Display) -> View {
        View { display, bars: None, phase: String::new() }
    }

    fn show(&mut self, job: &pb::Job) {
        match self.display {
            Display::Quiet => {}
            Display::Lines => {
                if job.phase != self.phase {
                    println!("job {}: phase {} ({})", job.job_id, job.phase, status_name(job.status()));
                }
            }
            Display::Bars => self.bars.get_or_insert_with(|| Bars::new(job)).update(job),
        }
        self.phase.clone_from(&job.phase);
    }

    fn finish(&mut self) {
        if let Some(bars) = self.bars.take() {
            for bar in bars.devices.values() {
                bar.finish();
            }
            bars.group.finish();
        }
    }
}

impl Bars {
    fn new(job: &pb::Job) -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let group_style = ProgressStyle::with_template(
            "{prefix:>16} [{bar:32}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta:>4} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let group = multi.add(ProgressBar::new(job.bytes_total.max(1)));
        group.set_style(group_style);
        group.set_prefix(if job.group.is_empty() { job.job_id.clone() } else { job.group.clone() });
        let device_style =
            ProgressStyle::with_template("{prefix:>16} [{bar:32}] {bytes:>10}/{total_bytes:<10} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        let devices = job
            .devices
            .iter()
            .map(|d| {
                let bar = multi.add(ProgressBar::new(d.bytes_total.max(1)));
                bar.set_style(device_style.clone());
                bar.set_prefix(d.name.clone());
                (d.name.clone(), bar)
            })
            .collect();
        Bars { _multi: multi, group, devices }
    }

    fn update(&self, job: &pb::Job) {
        self.group.set_length(job.bytes_total.max(job.bytes_done).max(1));
        self.group.set_position(job.bytes_done);
        self.group.set_message(format!("{} ({})", job.phase, status_name(job.status())));
        for d in &job.devices {
            if let Some(bar) = self.devices.get(&d.name) {
                bar.set_length(d.bytes_total.max(d.bytes_done).max(1));
                bar.set_position(d.bytes_done);
                let mut msg = d.state.clone();
                if d.verified {
                    msg.push_str(" verified");
                }
                if let Some(dirty) = job.dirty_tracking.iter().find(|c| c.device == d.name) {
                    msg.push_str(&format!(" dirty: {} ({} pages)", dirty.source, dirty.dirty_pages));
                }
                if !d.error.is_empty() {
                    msg.push_str(&format!(" error: {}", d.error));
                }
                bar.set_message(msg);
            }
        }
    }
}
