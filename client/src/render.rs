//! How devices, groups, plans, jobs and dirty tracking look on the terminal and in
//! `--json`. The JSON shapes are a stable interface for scripts: snake_case keys, enums as
//! lowercase words.

use std::fmt::Write;

use indicatif::HumanBytes;
use serde_json::{Value, json};
use vfio_migd_proto::v1 as pb;

pub fn status_name(status: pb::JobStatus) -> &'static str {
    match status {
        pb::JobStatus::Unspecified => "unspecified",
        pb::JobStatus::Running => "running",
        pb::JobStatus::Succeeded => "succeeded",
        pb::JobStatus::RolledBack => "rolled_back",
        pb::JobStatus::Failed => "failed",
        pb::JobStatus::InDoubt => "in_doubt",
        pb::JobStatus::Cancelled => "cancelled",
    }
}

pub fn role_name(role: pb::Role) -> &'static str {
    match role {
        pb::Role::Unspecified => "unspecified",
        pb::Role::Source => "source",
        pb::Role::Destination => "destination",
    }
}

/// `1.5 ms`, `230 ms`, `2.31 s`.
pub fn duration_ns(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

pub fn device_json(d: &pb::Device) -> Value {
    let identity = d.identity.clone().unwrap_or_default();
    json!({
        "name": d.name,
        "backend": d.backend,
        "caps": d.caps,
        "state": d.state,
        "identity": { "driver": identity.driver, "model": identity.model },
        "data_size": d.data_size,
        "dma_logging": d.dma_logging,
        "group": d.group,
        "job_id": d.job_id,
        "content_digest": d.content_digest,
    })
}

pub fn devices_table(devices: &[pb::Device]) -> String {
    if devices.is_empty() {
        return "no devices\n".into();
    }
    let mut out = format!(
        "{:<16} {:<10} {:<22} {:<12} {:>10} {:<12} {:<12}\n",
        "NAME", "BACKEND", "CAPS", "STATE", "DATA", "GROUP", "JOB"
    );
    for d in devices {
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<22} {:<12} {:>10} {:<12} {:<12}",
            d.name,
            d.backend,
            d.caps,
            d.state,
            HumanBytes(d.data_size).to_string(),
            dash(&d.group),
            dash(&d.job_id)
        );
    }
    out
}

pub fn device_details(d: &pb::Device) -> String {
    let identity = d.identity.clone().unwrap_or_default();
    format!(
        "name:        {}\nbackend:     {}\nidentity:    {}/{}\ncaps:        {}\nstate:       {}\n\
         data size:   {} ({} bytes)\ndma logging: {}\ngroup:       {}\njob:         {}\n{}",
        d.name,
        d.backend,
        identity.driver,
        identity.model,
        d.caps,
        d.state,
        HumanBytes(d.data_size),
        d.data_size,
        if d.dma_logging { "supported" } else { "not supported" },
        dash(&d.group),
        dash(&d.job_id),
        if d.content_digest.is_empty() {
            String::new()
        } else {
            format!("digest:      {}\n", d.content_digest)
        }
    )
}

pub fn group_json(g: &pb::Group) -> Value {
    json!({ "name": g.name, "devices": g.devices, "allow_multiple_non_p2p": g.allow_multiple_non_p2p })
}

pub fn groups_table(groups: &[pb::Group]) -> String {
    if groups.is_empty() {
        return "no groups\n".into();
    }
    let mut out = format!("{:<16} DEVICES\n", "NAME");
    for g in groups {
        let _ = writeln!(out, "{:<16} {}", g.name, g.devices.join(", "));
    }
    out
}

pub fn group_details(g: &pb::Group) -> String {
    format!(
        "name:    {}\ndevices: {}\nmultiple non-P2P devices allowed: {}\n",
        g.name,
        g.devices.join(", "),
        if g.allow_multiple_non_p2p { "yes" } else { "no" }
    )
}

pub fn plan_json(p: &pb::GroupPlan) -> Value {
    json!({
        "group": p.group,
        "devices": p.devices.iter().map(|d| json!({
            "name": d.name,
            "caps": d.caps,
            "p2p": d.p2p,
            "pre_copy": d.pre_copy,
            "data_size": d.data_size,
            "stop_order": d.stop_order,
        })).collect::<Vec<_>>(),
        "steps": p.steps,
        "total_data_size": p.total_data_size,
    })
}

pub fn plan_text(p: &pb::GroupPlan) -> String {
    let mut out = format!("plan for group {} ({} total)\n", p.group, HumanBytes(p.total_data_size));
    for d in &p.devices {
        let _ = writeln!(
            out,
            "  {:<16} {:<22} {:<20} {:>10}{}",
            d.name,
            d.caps,
            d.stop_order,
            HumanBytes(d.data_size).to_string(),
            if d.pre_copy { "  pre-copy" } else { "" }
        );
    }
    out.push_str("steps:\n");
    for (i, step) in p.steps.iter().enumerate() {
        let _ = writeln!(out, "  {}. {step}", i + 1);
    }
    out
}

pub fn job_json(j: &pb::Job) -> Value {
    json!({
        "job_id": j.job_id,
        "role": role_name(j.role()),
        "status": status_name(j.status()),
        "phase": j.phase,
        "group": j.group,
        "peer": j.peer,
        "devices": j.devices.iter().map(|d| json!({
            "name": d.name,
            "peer_name": d.peer_name,
            "state": d.state,
            "bytes_done": d.bytes_done,
            "bytes_total": d.bytes_total,
            "verified": d.verified,
            "error": d.error,
        })).collect::<Vec<_>>(),
        "phases": j.phases.iter().map(|p| json!({
            "phase": p.phase,
            "started_unix_ns": p.started_unix_ns,
            "duration_ns": p.duration_ns,
        })).collect::<Vec<_>>(),
        "bytes_done": j.bytes_done,
        "bytes_total": j.bytes_total,
        "rate_bytes_per_sec": j.rate_bytes_per_sec,
        "eta_ms": j.eta_ms,
        "downtime_ns": j.downtime_ns,
        "error": j.error,
        "created_unix_ns": j.created_unix_ns,
        "finished_unix_ns": j.finished_unix_ns,
        "plan": j.plan,
        "dirty_tracking": j.dirty_tracking.iter().map(device_coverage_json).collect::<Vec<_>>(),
    })
}

pub fn jobs_table(jobs: &[pb::Job]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".into();
    }
    let mut out = format!(
        "{:<20} {:<12} {:<12} {:<14} {:<12} {:>10}\n",
        "JOB", "ROLE", "STATUS", "PHASE", "GROUP", "BYTES"
    );
    for j in jobs {
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<12} {:<14} {:<12} {:>10}",
            j.job_id,
            role_name(j.role()),
            status_name(j.status()),
            j.phase,
            dash(&j.group),
            HumanBytes(j.bytes_done).to_string()
        );
    }
    out
}

/// The job in full: identity, outcome, per-device progress, time per phase.
pub fn job_details(j: &pb::Job) -> String {
    let mut out = format!(
        "job {} ({}): {}, phase {}\n",
        j.job_id,
        role_name(j.role()),
        status_name(j.status()),
        j.phase
    );
    if !j.group.is_empty() {
        let _ = writeln!(out, "group:    {}", j.group);
    }
    if !j.peer.is_empty() {
        let _ = writeln!(out, "peer:     {}", j.peer);
    }
    if !j.error.is_empty() {
        let _ = writeln!(out, "error:    {}", j.error);
    }
    out.push_str(&summary(j));
    if !j.dirty_tracking.is_empty() {
        out.push_str("dirty tracking:\n");
        out.push_str(&coverage_table(&j.dirty_tracking));
    }
    out
}

/// The end-of-job summary: bytes, duration, downtime, each device, time per phase.
pub fn summary(j: &pb::Job) -> String {
    let mut out = String::new();
    let elapsed_ns = if j.finished_unix_ns > j.created_unix_ns {
        j.finished_unix_ns - j.created_unix_ns
    } else {
        j.phases.iter().map(|p| p.duration_ns).sum()
    };
    let _ = write!(out, "moved:    {} in {}", HumanBytes(j.bytes_done), duration_ns_or_dash(elapsed_ns));
    if j.rate_bytes_per_sec > 0.0 {
        let _ = write!(out, " ({}/s)", HumanBytes(j.rate_bytes_per_sec as u64));
    }
    out.push('\n');
    if j.downtime_ns > 0 {
        let _ = writeln!(out, "downtime: {}", duration_ns(j.downtime_ns));
    }
    for d in &j.devices {
        let _ = writeln!(
            out,
            "  {:<16} -> {:<16} {:>10} / {:<10} {:<12}{}{}",
            d.name,
            d.peer_name,
            HumanBytes(d.bytes_done).to_string(),
            HumanBytes(d.bytes_total).to_string(),
            d.state,
            if d.verified { " verified" } else { "" },
            if d.error.is_empty() { String::new() } else { format!(" error: {}", d.error) }
        );
    }
    if !j.phases.is_empty() {
        let phases: Vec<String> =
            j.phases.iter().map(|p| format!("{} {}", p.phase, duration_ns(p.duration_ns))).collect();
        let _ = writeln!(out, "phases:   {}", phases.join(", "));
    }
    out
}

pub fn device_coverage_json(d: &pb::DeviceDirtyCoverage) -> Value {
    json!({
        "device": d.device,
        "source": d.source,
        "page_size": d.page_size,
        "reason": d.reason,
        "dirty_pages": d.dirty_pages,
        "reports": d.reports,
        "report_errors": d.report_errors,
        "last_report_ns": d.last_report_ns,
    })
}

fn iova_range_json(r: &pb::IovaRange) -> Value {
    json!({ "iova": r.iova, "length": r.length })
}

pub fn dirty_tracking_json(t: &pb::DirtyTracking) -> Value {
    json!({
        "group": t.group,
        "active": t.active,
        "page_size": t.page_size,
        "ranges": t.ranges.iter().map(iova_range_json).collect::<Vec<_>>(),
        "devices": t.devices.iter().map(device_coverage_json).collect::<Vec<_>>(),
    })
}

/// The group's tracking: state, layout, and one row per device.
pub fn dirty_tracking_text(t: &pb::DirtyTracking) -> String {
    if t.page_size == 0 {
        return format!("group {}: dirty tracking is not started\n", t.group);
    }
    let guest: u64 = t.ranges.iter().map(|r| r.length).sum();
    let layout: Vec<String> =
        t.ranges.iter().map(|r| format!("{:#x}+{}", r.iova, HumanBytes(r.length))).collect();
    let mut out = format!(
        "group {}: dirty tracking {}, {} pages, {} of guest in {} range(s): {}\n",
        t.group,
        if t.active { "active" } else { "stopped" },
        HumanBytes(t.page_size),
        HumanBytes(guest),
        t.ranges.len(),
        layout.join(", ")
    );
    out.push_str(&coverage_table(&t.devices));
    let uncovered = t.devices.iter().filter(|d| d.source == "none").count();
    if t.active && uncovered > 0 {
        let _ = writeln!(out, "{uncovered} device(s) not covered: pages they write by DMA are not reported");
    }
    out
}

/// One row per device: which source covers it and what it found.
pub fn coverage_table(devices: &[pb::DeviceDirtyCoverage]) -> String {
    let mut out = format!(
        "  {:<16} {:<14} {:>9} {:>11} {:>8} {:>7} {:>12}\n",
        "DEVICE", "SOURCE", "PAGE", "DIRTY PAGES", "REPORTS", "ERRORS", "LAST REPORT"
    );
    for d in devices {
        let page = if d.page_size == 0 { "-".to_owned() } else { HumanBytes(d.page_size).to_string() };
        let latency =
            if d.reports + d.report_errors == 0 { "-".to_owned() } else { duration_ns(d.last_report_ns) };
        let _ = write!(
            out,
            "  {:<16} {:<14} {:>9} {:>11} {:>8} {:>7} {:>12}",
            d.device, d.source, page, d.dirty_pages, d.reports, d.report_errors, latency
        );
        if !d.reason.is_empty() {
            let _ = write!(out, "  {}", d.reason);
        }
        out.push('\n');
    }
    out
}

fn duration_ns_or_dash(ns: u64) -> String {
    if ns == 0 { "-".into() } else { duration_ns(ns) }
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_ns(1_500_000), "1.50 ms");
        assert_eq!(duration_ns(230_000_000), "230 ms");
        assert_eq!(duration_ns(2_310_000_000), "2.31 s");
    }

    #[test]
    fn a_finished_job_summarises_bytes_downtime_and_phases() {
        let job = pb::Job {
            job_id: "j1".into(),
            role: pb::Role::Source.into(),
            status: pb::JobStatus::Succeeded.into(),
            phase: "done".into(),
            bytes_done: 3 << 20,
            downtime_ns: 45_000_000,
            created_unix_ns: 1_000_000_000,
            finished_unix_ns: 3_000_000_000,
            devices: vec![pb::DeviceProgress {
                name: "nic0".into(),
                peer_name: "nic9".into(),
                verified: true,
                ..Default::default()
            }],
            phases: vec![pb::PhaseTime {
                phase: "drain".into(),
                started_unix_ns: 0,
                duration_ns: 12_000_000,
            }],
            ..Default::default()
        };
        let text = job_details(&job);
        assert!(text.contains("succeeded"), "{text}");
        assert!(text.contains("3.00 MiB in 2.00 s"), "{text}");
        assert!(text.contains("downtime: 45 ms"), "{text}");
        assert!(text.contains("nic0") && text.contains("verified"), "{text}");
        assert!(text.contains("drain 12 ms"), "{text}");
        let value = job_json(&job);
        assert_eq!(value["status"], "succeeded");
        assert_eq!(value["role"], "source");
        assert!(!text.contains("dirty tracking"), "{text}");
        assert_eq!(value["dirty_tracking"], json!([]));
    }

    fn coverage() -> Vec<pb::DeviceDirtyCoverage> {
        vec![
            pb::DeviceDirtyCoverage {
                device: "nic0".into(),
                source: "dma-logging".into(),
                page_size: 4096,
                dirty_pages: 12,
                reports: 3,
                last_report_ns: 1_500_000,
                ..Default::default()
            },
            pb::DeviceDirtyCoverage {
                device: "uart0".into(),
                source: "none".into(),
                reason: "the driver has no DMA logging".into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn a_job_shows_its_devices_dirty_statistics() {
        let job = pb::Job { job_id: "j1".into(), dirty_tracking: coverage(), ..Default::default() };
        let text = job_details(&job);
        assert!(text.contains("dirty tracking:"), "{text}");
        let nic = text.lines().find(|l| l.contains("nic0") && l.contains("dma-logging")).expect(&text);
        assert!(nic.contains("4.00 KiB") && nic.contains("12") && nic.contains("1.50 ms"), "{nic}");
        let uart = text.lines().find(|l| l.contains("uart0")).expect(&text);
        assert!(uart.contains("none") && uart.contains("the driver has no DMA logging"), "{uart}");
        let value = job_json(&job);
        assert_eq!(value["dirty_tracking"][0]["source"], "dma-logging");
        assert_eq!(value["dirty_tracking"][0]["reports"], 3);
        assert_eq!(value["dirty_tracking"][1]["reason"], "the driver has no DMA logging");
    }

    #[test]
    fn tracking_status_says_whether_it_runs_and_what_is_not_covered() {
        let tracking = pb::DirtyTracking {
            group: "vm1".into(),
            active: true,
            page_size: 4096,
            ranges: vec![pb::IovaRange { iova: 1 << 32, length: 2 << 30 }],
            devices: coverage(),
        };
        let text = dirty_tracking_text(&tracking);
        assert!(text.starts_with("group vm1: dirty tracking active, 4.00 KiB pages, 2.00 GiB"), "{text}");
        assert!(text.contains("0x100000000+2.00 GiB"), "{text}");
        assert!(text.contains("1 device(s) not covered"), "{text}");
        let value = dirty_tracking_json(&tracking);
        assert_eq!(value["ranges"][0]["iova"], 1u64 << 32);
        assert_eq!(value["devices"][1]["source"], "none");
        let untracked = pb::DirtyTracking { group: "vm2".into(), ..Default::default() };
        assert_eq!(dirty_tracking_text(&untracked), "group vm2: dirty tracking is not started\n");
    }
}
