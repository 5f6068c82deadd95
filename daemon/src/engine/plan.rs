//! The group plan: how each device of one VM will be moved, decided up front from the
//! devices' capabilities and nothing else (pure, no I/O).
//!
//! Rules (kernel uAPI, "P2P quiescing"): every P2P-capable device reaches RUNNING_P2P (or
//! PRE_COPY_P2P) before any device stops. A device without P2P has no quiesced state —
//! RUNNING → STOP is one arc — so it is stopped only after that barrier, while the others
//! still accept its DMA. Two such devices cannot be ordered against each other, so a group
//! with two or more is refused unless the caller vouches that they never do P2P DMA
//! (QEMU refuses such multi-device migrations outright).

use std::fmt;

use crate::fsm::Caps;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    pub name: String,
    pub caps: Caps,
    /// MIG_DATA_SIZE: the STOP_COPY stream estimate.
    pub data_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOrder {
    /// Quiesced through RUNNING_P2P at the P2P barrier.
    P2pQuiesce,
    /// No P2P state: stopped in one arc, after every other device is quiesced.
    StopAfterBarrier,
}

impl StopOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            StopOrder::P2pQuiesce => "p2p-quiesce",
            StopOrder::StopAfterBarrier => "stop-after-barrier",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    pub name: String,
    pub caps: Caps,
    pub data_size: u64,
    pub stop_order: StopOrder,
    /// The device streams its initial state in PRE_COPY while the VM runs.
    pub pre_copy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPlan {
    pub devices: Vec<DevicePlan>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the group has no devices")]
    Empty,
    #[error("device `{0}` is not migratable (no STOP_COPY capability)")]
    NotMigratable(String),
    #[error(
        "devices {0:?} have no P2P capability and cannot be quiesced against each other; \
         allow it explicitly only if they never do peer-to-peer DMA"
    )]
    MultipleNonP2p(Vec<String>),
}

pub fn plan_group(
    devices: &[DeviceFacts],
    allow_multiple_non_p2p: bool,
    pre_copy_enabled: bool,
) -> Result<GroupPlan, PlanError> {
    if devices.is_empty() {
        return Err(PlanError::Empty);
    }
    if let Some(d) = devices.iter().find(|d| !d.caps.is_migratable()) {
        return Err(PlanError::NotMigratable(d.name.clone()));
    }
    let non_p2p: Vec<String> = devices.iter().filter(|d| !d.caps.has_p2p()).map(|d| d.name.clone()).collect();
    if non_p2p.len() > 1 && !allow_multiple_non_p2p {
        return Err(PlanError::MultipleNonP2p(non_p2p));
    }
    Ok(GroupPlan {
        devices: devices
            .iter()
            .map(|d| DevicePlan {
                name: d.name.clone(),
                caps: d.caps,
                data_size: d.data_size,
                stop_order: if d.caps.has_p2p() {
                    StopOrder::P2pQuiesce
                } else {
                    StopOrder::StopAfterBarrier
                },
                pre_copy: pre_copy_enabled && d.caps.has_pre_copy(),
            })
            .collect(),
    })
}

impl GroupPlan {
    pub fn total_data_size(&self) -> u64 {
        self.devices.iter().map(|d| d.data_size).sum()
    }

    pub fn any_pre_copy(&self) -> bool {
        self.devices.iter().any(|d| d.pre_copy)
    }

    /// The phases this plan walks, for logs, the job and the dry-run API.
    pub fn steps(&self) -> Vec<String> {
        let names = |pred: &dyn Fn(&DevicePlan) -> bool| {
            self.devices.iter().filter(|d| pred(d)).map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
        };
        let mut steps =
            vec!["handshake: destination checks mapping and compatibility, devices -> RESUMING".into()];
        if self.any_pre_copy() {
            steps.push(format!(
                "pre-copy: {} -> PRE_COPY, initial data streamed while running",
                names(&|d| d.pre_copy)
            ));
        }
        let p2p = names(&|d| d.stop_order == StopOrder::P2pQuiesce);
        if !p2p.is_empty() {
            steps.push(format!("p2p barrier: {p2p} -> RUNNING_P2P / PRE_COPY_P2P in parallel"));
        }
        let late = names(&|d| d.stop_order == StopOrder::StopAfterBarrier);
        if !late.is_empty() {
            steps.push(format!("stop after barrier: {late} (no P2P state)"));
        }
        steps.push("stop-copy barrier: every device -> STOP_COPY".into());
        steps.push("drain: every data_fd read to EOF in parallel, framed and checksummed".into());
        steps.push("await loaded: destination verifies every stream, devices RESUMING -> STOP".into());
        steps.push("commit: decision journaled (fsync) on the source, then sent".into());
        steps.push("resume: destination devices -> RUNNING_P2P (barrier) -> RUNNING".into());
        steps.push("cleanup: source devices STOP_COPY -> STOP".into());
        steps
    }
}

impl fmt::Display for GroupPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{}[{}; {}{}; {} B]",
                    d.name,
                    d.caps,
                    d.stop_order.as_str(),
                    if d.pre_copy { "; pre-copy" } else { "" },
                    d.data_size
                )
            })
            .collect();
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str, caps: &str) -> DeviceFacts {
        DeviceFacts { name: name.into(), caps: Caps::parse(caps).unwrap(), data_size: 100 }
    }

    #[test]
    fn plans_by_capability() {
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, Result<&'a [(StopOrder, bool)], PlanError>);
        let cases: &[Case] = &[
            (&[("a", "STOP_COPY|P2P|PRE_COPY")], false, Ok(&[(StopOrder::P2pQuiesce, true)])),
            (
                &[("a", "STOP_COPY|P2P"), ("b", "STOP_COPY")],
                false,
                Ok(&[(StopOrder::P2pQuiesce, false), (StopOrder::StopAfterBarrier, false)]),
            ),
            (
                &[("a", "STOP_COPY|PRE_COPY"), ("b", "STOP_COPY")],
                false,
                Err(PlanError::MultipleNonP2p(vec!["a".into(), "b".into()])),
            ),
            (
                &[("a", "STOP_COPY|PRE_COPY"), ("b", "STOP_COPY")],
                true,
                Ok(&[(StopOrder::StopAfterBarrier, true), (StopOrder::StopAfterBarrier, false)]),
            ),
            (&[("a", "P2P")], false, Err(PlanError::NotMigratable("a".into()))),
            (&[], false, Err(PlanError::Empty)),
        ];
        for (devices, allow, expected) in cases {
            let facts: Vec<DeviceFacts> = devices.iter().map(|(n, c)| facts(n, c)).collect();
            let got = plan_group(&facts, *allow, true)
                .map(|p| p.devices.iter().map(|d| (d.stop_order, d.pre_copy)).collect::<Vec<_>>());
            assert_eq!(got, expected.clone().map(|e| e.to_vec()), "{devices:?} allow={allow}");
        }
    }

    #[test]
    fn pre_copy_can_be_disabled() {
        let plan = plan_group(&[facts("a", "STOP_COPY|P2P|PRE_COPY")], false, false).unwrap();
        assert!(!plan.any_pre_copy());
        assert!(!plan.steps().iter().any(|s| s.starts_with("pre-copy")));
    }

    #[test]
    fn steps_name_the_late_stopper() {
        let plan =
            plan_group(&[facts("gpu", "STOP_COPY|P2P"), facts("acc", "STOP_COPY")], false, true).unwrap();
        let steps = plan.steps();
        assert!(steps.iter().any(|s| s.contains("p2p barrier: gpu")));
        assert!(steps.iter().any(|s| s.contains("stop after barrier: acc")));
        assert_eq!(plan.total_data_size(), 200);
        assert!(plan.to_string().contains("acc[STOP_COPY; stop-after-barrier; 100 B]"));
    }
}
