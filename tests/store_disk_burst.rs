//! The disk store under a burst of writes from several threads at once, then a flush as
//! at a shutdown: every write and the flush come back. fjall 3.1 can deadlock its own
//! workers when writers flood them with rotation requests (fjall-rs/fjall#323); the
//! store rotates its memtables itself so that its writers never send those requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::mpsc;
use std::time::Duration;

use support::disk::{open_store, put_record};

const WRITERS: u64 = 4;
const RECORDS_EACH: u64 = 60_000;

/// Several writers each put [`RECORDS_EACH`] records of 1 KiB, then the store flushes.
/// A store that stops making progress fails the test instead of hanging it.
#[test]
fn a_burst_of_writes_and_a_flush_all_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WRITERS as usize)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(burst(&path));
        done.send(()).unwrap();
    });
    let deadline = Duration::from_secs(600);
    match finished.recv_timeout(deadline) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the burst failed: see its panic above"),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "the disk store stopped making progress: {} records and a flush not done in {deadline:?}",
            WRITERS * RECORDS_EACH
        ),
    }
}

async fn burst(path: &std::path::Path) {
    let stop = tokio_util::sync::CancellationToken::new();
    let store = open_store(path, &stop);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in w * RECORDS_EACH..(w + 1) * RECORDS_EACH {
                put_record(&store, i, 1024).await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    store.flush_now().unwrap();
    stop.cancel();
}
