//! `vfio-migctl dirty pages`: what one `GetDirtyPages` call returned, as the runs of dirty
//! pages an operator or a script copies.
//!
//! The daemon sends sparse regions as ranges and dense ones as bitmap chunks (whichever is
//! smaller); here both become runs `(iova, length)`, sorted and joined where they touch,
//! so that the output does not depend on how the daemon chose to encode a region.

use std::fmt::Write as _;
use std::io::{self, Write};

use indicatif::HumanBytes;
use serde_json::{Value, json};
use vfio_migd_proto::v1 as pb;

/// Runs printed in the text output before the rest is only counted.
const RUNS_SHOWN: usize = 16;

/// A run of dirty pages: `length` bytes from `iova`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub iova: u64,
    pub length: u64,
}

/// Every dirty page of `pages` as runs, sorted by IOVA, touching runs joined. Page `n` of
/// a chunk is bit `n % 64` of word `n / 64` (the kernel's layout); bits past `pages` are
/// ignored.
pub fn runs(pages: &pb::DirtyPages) -> Vec<Run> {
    let page_size = pages.page_size;
    let mut found: Vec<Run> = pages.ranges.iter().map(|r| Run { iova: r.iova, length: r.length }).collect();
    for chunk in &pages.chunks {
        for (index, &word) in chunk.words.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let first = rest.trailing_zeros();
                let ones = (!(rest >> first)).trailing_zeros().min(64 - first);
                let page = index as u64 * 64 + u64::from(first);
                let count = u64::from(ones).min(chunk.pages.saturating_sub(page));
                if count == 0 {
                    break;
                }
                found.push(Run {
                    iova: chunk.iova.saturating_add(page.saturating_mul(page_size)),
                    length: count.saturating_mul(page_size),
                });
                rest = if first + ones >= 64 { 0 } else { rest & (u64::MAX << (first + ones)) };
            }
        }
    }
    found.sort_by_key(|r| r.iova);
    let mut joined: Vec<Run> = Vec::with_capacity(found.len());
    for run in found {
        match joined.last_mut() {
            Some(last) if last.iova.saturating_add(last.length) >= run.iova => {
                let end = (last.iova + last.length).max(run.iova.saturating_add(run.length));
                last.length = end - last.iova;
            }
            _ => joined.push(run),
        }
    }
    joined
}

fn run_json(run: &Run) -> Value {
    json!({ "iova": run.iova, "length": run.length })
}

/// `--output FILE`: one JSON object per line, `{"iova":N,"length":N}`, in IOVA order.
pub fn write_runs(out: &mut impl Write, runs: &[Run]) -> io::Result<()> {
    for run in runs {
        serde_json::to_writer(&mut *out, &run_json(run))?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// `--json`: the counts, and the runs unless they went to a file.
pub fn pages_json(group: &str, pages: &pb::DirtyPages, runs: &[Run], written_to: Option<&str>) -> Value {
    let mut value = json!({
        "group": group,
        "page_size": pages.page_size,
        "dirty_pages": pages.dirty_pages,
        "dirty_bytes": pages.dirty_pages.saturating_mul(pages.page_size),
        "sparse_ranges": pages.ranges.len(),
        "bitmap_chunks": pages.chunks.len(),
        "run_count": runs.len(),
    });
    match written_to {
        Some(path) => value["output"] = json!(path),
        None => value["runs"] = json!(runs.iter().map(run_json).collect::<Vec<_>>()),
    }
    value
}

/// The text output: how many pages, how the daemon sent them, and the first runs.
pub fn pages_text(group: &str, pages: &pb::DirtyPages, runs: &[Run], written_to: Option<&str>) -> String {
    let mut out = format!(
        "group {group}: {} dirty page(s) of {} ({}), sent as {} range(s) and {} bitmap chunk(s); \
         {} run(s)\n",
        pages.dirty_pages,
        HumanBytes(pages.page_size),
        HumanBytes(pages.dirty_pages.saturating_mul(pages.page_size)),
        pages.ranges.len(),
        pages.chunks.len(),
        runs.len()
    );
    if let Some(path) = written_to {
        let _ = writeln!(out, "every run written to {path} (one JSON object per line)");
        return out;
    }
    for run in runs.iter().take(RUNS_SHOWN) {
        let count = run.length / pages.page_size.max(1);
        let _ = writeln!(
            out,
            "  {:#014x}  {:>10}  {count} page(s)",
            run.iova,
            HumanBytes(run.length).to_string()
        );
    }
    if runs.len() > RUNS_SHOWN {
        let _ = writeln!(
            out,
            "  ... and {} more run(s): --output FILE or --json lists them all",
            runs.len() - RUNS_SHOWN
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn chunks_decode_in_the_kernel_layout_and_join_the_ranges_they_touch() {
        let pages = pb::DirtyPages {
            page_size: PAGE,
            ranges: vec![
                pb::IovaRange { iova: 0x10_0000 - 2 * PAGE, length: 2 * PAGE },
                pb::IovaRange { iova: 0x4000_0000, length: PAGE },
            ],
            chunks: vec![pb::DirtyBitmapChunk {
                iova: 0x10_0000,
                pages: 130,
                // Pages 0-1, 63-64 (across a word), 127, and bits past `pages`.
                words: vec![0b11 | 1 << 63, 1 | 1 << 63, 0b1111 | 1 << 10],
            }],
            dirty_pages: 2 + 1 + 2 + 2 + 1 + 2,
        };
        let found = runs(&pages);
        assert_eq!(
            found,
            [
                Run { iova: 0x10_0000 - 2 * PAGE, length: 4 * PAGE },
                Run { iova: 0x10_0000 + 63 * PAGE, length: 2 * PAGE },
                Run { iova: 0x10_0000 + 127 * PAGE, length: 3 * PAGE },
                Run { iova: 0x4000_0000, length: PAGE },
            ]
        );
        let mut file = Vec::new();
        write_runs(&mut file, &found).unwrap();
        let text = String::from_utf8(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], format!("{{\"iova\":{},\"length\":{}}}", 0x10_0000 - 2 * PAGE, 4 * PAGE));
    }

    #[test]
    fn a_full_word_is_one_run() {
        let pages = pb::DirtyPages {
            page_size: PAGE,
            ranges: vec![],
            chunks: vec![pb::DirtyBitmapChunk { iova: 0, pages: 128, words: vec![u64::MAX, u64::MAX] }],
            dirty_pages: 128,
        };
        assert_eq!(runs(&pages), [Run { iova: 0, length: 128 * PAGE }]);
    }

    #[test]
    fn the_text_shows_the_first_runs_and_counts_the_rest() {
        let ranges: Vec<pb::IovaRange> =
            (0..20).map(|n| pb::IovaRange { iova: n * 2 * PAGE, length: PAGE }).collect();
        let pages = pb::DirtyPages { page_size: PAGE, ranges, chunks: vec![], dirty_pages: 20 };
        let found = runs(&pages);
        let text = pages_text("vm", &pages, &found, None);
        assert!(text.starts_with("group vm: 20 dirty page(s) of 4.00 KiB"), "{text}");
        assert!(text.contains("20 range(s) and 0 bitmap chunk(s)"), "{text}");
        assert!(text.contains("and 4 more run(s)"), "{text}");
        let value = pages_json("vm", &pages, &found, None);
        assert_eq!(value["runs"].as_array().map(Vec::len), Some(20));
        let written = pages_json("vm", &pages, &found, Some("/tmp/x"));
        assert!(written.get("runs").is_none());
        assert_eq!(written["output"], "/tmp/x");
    }
}
