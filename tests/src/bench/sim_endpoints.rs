//! Simulated devices at both ends of the stream benchmark: the source is a device moved
//! to STOP_COPY whose saving `data_fd` yields its whole state, the sink a device of the
//! same model moved to RESUMING. Both arms of the comparison (the stream and the plain
//! relay) move the same bytes between the same kind of devices, so the ratio is the
//! stream's own cost, not the simulator's.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use vfio_migd::device::MigrationDevice;
use vfio_migd::device::sim::{SimDevice, SimSpec, StateId};
use vfio_migd::fsm::{Caps, State};
use vfio_migd::stream::bench::{BenchEndpoints, Endpoint};

const MODEL: &str = "sim-bench-stream";

/// Source and sink devices with `state_size` bytes of state each.
pub struct SimEndpoints {
    state_size: u64,
    /// The state each device index's source holds, for the sink to check what it loaded.
    sent: Arc<Mutex<HashMap<u32, StateId>>>,
}

impl SimEndpoints {
    pub fn new(state_size: u64) -> SimEndpoints {
        SimEndpoints { state_size, sent: Arc::default() }
    }

    fn spec(&self, name: String, seed: u64) -> SimSpec {
        let mut spec = SimSpec::new(name);
        spec.model = MODEL.into();
        spec.state_size = self.state_size;
        spec.caps = Caps::STOP_COPY.union(Caps::P2P);
        spec.seed = Some(seed);
        spec
    }
}

fn device_error(error: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(error)
}

impl BenchEndpoints for SimEndpoints {
    fn source(&self, device: u32, bytes: u64) -> io::Result<Endpoint> {
        if bytes != self.state_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("these endpoints hold {} bytes per device, {bytes} were asked for", self.state_size),
            ));
        }
        let sim = SimDevice::new(self.spec(format!("bench-src-{device}"), 0x5eed_0000 + u64::from(device)))
            .map_err(device_error)?;
        let fd = sim.set_state(State::StopCopy).map_err(device_error)?.ok_or_else(|| {
            io::Error::other(format!("device {device}: STOP_COPY opened no saving data_fd"))
        })?;
        self.sent.lock().unwrap_or_else(PoisonError::into_inner).insert(device, sim.state_id());
        Ok(Endpoint {
            fd,
            // The device must outlive the transfer: dropping it disables its data_fd.
            done: Box::new(move || {
                drop(sim);
                Ok(bytes)
            }),
        })
    }

    fn sink(&self, device: u32) -> io::Result<Endpoint> {
        let sim = SimDevice::new(self.spec(format!("bench-dst-{device}"), 0xd057_0000 + u64::from(device)))
            .map_err(device_error)?;
        let fd = sim.set_state(State::Resuming).map_err(device_error)?.ok_or_else(|| {
            io::Error::other(format!("device {device}: RESUMING opened no resuming data_fd"))
        })?;
        // The stream benchmark opens sinks before sources: look the source up at the end.
        let sent = Arc::clone(&self.sent);
        Ok(Endpoint { fd, done: Box::new(move || load(&sim, device, &sent)) })
    }
}

impl SimEndpoints {
    /// What the endpoints alone reach: every source copied straight into its sink by one
    /// thread per device (1 MiB buffer, no network, no framing), in GB/s from the first
    /// read until every sink has loaded its state. Neither arm of the comparison can beat it.
    pub fn direct_trial(&self, devices: u32) -> io::Result<f64> {
        let mut pairs = Vec::with_capacity(devices as usize);
        for device in 0..devices {
            pairs.push((self.source(device, self.state_size)?, self.sink(device)?));
        }
        let started = Instant::now();
        let copies: Vec<_> = pairs
            .into_iter()
            .map(|(source, sink)| {
                thread::spawn(move || -> io::Result<u64> {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = (&source.fd).read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        sink.fd.write_all_bytes(&buf[..n]).map_err(io::Error::from)?;
                    }
                    drop((source.fd, sink.fd));
                    let loaded = (sink.done)()?;
                    (source.done)()?;
                    Ok(loaded)
                })
            })
            .collect();
        let mut moved = 0;
        for copy in copies {
            moved += copy.join().unwrap_or_else(|_| Err(io::Error::other("direct copy thread panicked")))?;
        }
        Ok(moved as f64 / started.elapsed().as_secs_f64() / 1e9)
    }
}

/// RESUMING -> STOP: the simulated driver checks the stream's framing, every payload byte
/// and its digest; then the loaded state must be the one the source sent.
fn load(sim: &SimDevice, device: u32, sent: &Mutex<HashMap<u32, StateId>>) -> io::Result<u64> {
    sim.set_state(State::Stop).map_err(device_error)?;
    let expected = sent.lock().unwrap_or_else(PoisonError::into_inner).get(&device).copied();
    match (sim.loaded_state(), expected) {
        (Some(loaded), Some(sent)) if loaded == sent => Ok(loaded.size),
        (loaded, sent) => {
            Err(io::Error::other(format!("device {device}: loaded {loaded:?}, but the source sent {sent:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use vfio_migd::stream::StreamOptions;
    use vfio_migd::stream::bench::{BenchSetup, compare};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_arms_load_every_source_state_into_its_sink() {
        let setup = BenchSetup {
            devices: 2,
            bytes_per_device: (2 << 20) + 17,
            opts: StreamOptions { connections: 2, ..StreamOptions::default() },
            tls: None,
        };
        let endpoints = Arc::new(SimEndpoints::new(setup.bytes_per_device));
        let comparison = compare(endpoints.clone(), &setup, 1).await.unwrap();
        assert!(comparison.value > 0.0 && comparison.baseline > 0.0);
        assert_eq!(endpoints.sent.lock().unwrap().len(), 2);
        assert!(endpoints.direct_trial(2).unwrap() > 0.0);
    }

    #[test]
    fn a_sink_that_loads_another_state_fails() {
        let endpoints = SimEndpoints::new(64 << 10);
        let source = endpoints.source(0, 64 << 10).unwrap();
        let sink = endpoints.sink(1).unwrap();
        // Device 1 has a source too (another seed), whose state never reaches the sink.
        let _unsent = endpoints.source(1, 64 << 10).unwrap();
        let stream = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = source.fd.read_chunk(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                sink.fd.write_all_bytes(&buf[..n]).unwrap();
            }
            drop(source.fd);
            drop(sink.fd);
            ((source.done)(), (sink.done)())
        });
        let (sent, loaded) = stream.join().unwrap();
        assert_eq!(sent.unwrap(), 64 << 10);
        // Device 1's sink got device 0's state: the load succeeds, the check does not.
        let err = loaded.unwrap_err().to_string();
        assert!(err.contains("device 1: loaded"), "{err}");
    }

    #[test]
    fn a_source_of_another_size_is_refused() {
        let endpoints = SimEndpoints::new(4096);
        assert_eq!(endpoints.source(0, 8192).err().map(|e| e.kind()), Some(io::ErrorKind::InvalidInput));
    }
}
