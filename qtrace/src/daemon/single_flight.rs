//! One scrape at a time, shared: callers that arrive while a collection runs wait for the next
//! one to start and then all take its result, so 200 concurrent scrapes cost one or two
//! collections (a handful of threads), not 200. A collection that fails or panics is an error
//! for the callers that waited on it, and the next caller tries again.

use std::{sync::Arc, time::Instant};

use anyhow::{anyhow, Result};

pub struct SingleFlight<T> {
    /// The latest result and when its collection started.
    last: tokio::sync::Mutex<Option<(Instant, Arc<T>)>>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        Self {
            last: tokio::sync::Mutex::new(None),
        }
    }
}

impl<T: Send + Sync + 'static> SingleFlight<T> {
    /// A result of `work` run (on a blocking thread) after this call began: the one a caller
    /// before it started in the meantime, or a new run.
    pub async fn run(&self, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<Arc<T>> {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, value)) = last.as_ref() {
            if *started >= asked {
                return Ok(value.clone());
            }
        }
        let started = Instant::now();
        let value = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| anyhow!("the collection did not complete: {e}"))??;
        let value = Arc::new(value);
        *last = Some((started, value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_collections_and_a_panic_is_an_error() {
        let flight = Arc::new(SingleFlight::<usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (flight, runs) = (flight.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                flight
                    .run(move || {
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(runs.fetch_add(1, Ordering::SeqCst))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = runs.load(Ordering::SeqCst);
        assert!(n <= 2, "50 concurrent callers ran {n} collections");
        let e = flight.run(|| -> Result<usize> { panic!("boom") }).await;
        assert!(e.is_err());
        assert!(flight.run(|| Ok(7)).await.is_ok_and(|v| *v == 7));
    }
}
