//! The client side in a scrape: the kernel's per-destination connect() counts, capped for
//! export like the listeners (`--max-destination-series`): past the cap, destinations are
//! summed into one `other` row and counted.

use qtrace_common::ClientKey;

use crate::kernel::clients::ClientStats;

/// Default of `--max-destination-series`.
pub const DEFAULT_MAX_SERIES: usize = 1000;

#[derive(Clone, Debug, Default)]
pub struct Clients {
    /// Whether the client probe is attached: without it every client counter is unavailable.
    pub available: bool,
    /// Destinations with their own series, by key.
    pub rows: Vec<ClientStats>,
    /// The sum of the destinations past the cap (None when nothing was folded).
    pub other: Option<ClientStats>,
    /// How many destinations were folded into `other`.
    pub folded: usize,
}

impl Clients {
    /// `counted` (sorted by key) with at most `max_series` rows of their own.
    pub fn capped(available: bool, mut counted: Vec<ClientStats>, max_series: usize) -> Self {
        let over = counted.split_off(counted.len().min(max_series));
        let folded = over.len();
        let other = over.into_iter().reduce(|mut sum, s| {
            sum.add(&s);
            sum
        });
        Self {
            available,
            rows: counted,
            other: other.map(|mut o| {
                o.key = ClientKey::default();
                o
            }),
            folded,
        }
    }
}

#[cfg(test)]
mod tests {
    use qtrace_common::{ClientCounter, ClientCounter::ConnectNoPort};

    use super::*;

    fn stats(port: u16, no_port: u64) -> ClientStats {
        let mut counts = [0; ClientCounter::COUNT];
        counts[ConnectNoPort as usize] = no_port;
        ClientStats {
            key: ClientKey {
                dport: port,
                ..Default::default()
            },
            counts,
        }
    }

    #[test]
    fn destinations_past_the_cap_are_summed_and_counted() {
        let c = Clients::capped(true, vec![stats(1, 1), stats(2, 2), stats(3, 4)], 1);
        assert_eq!(c.rows, vec![stats(1, 1)]);
        assert_eq!(c.folded, 2);
        assert_eq!(c.other.unwrap().get(ConnectNoPort), 6);
        let all = Clients::capped(true, vec![stats(1, 1)], 5);
        assert_eq!((all.folded, all.other), (0, None));
    }
}
