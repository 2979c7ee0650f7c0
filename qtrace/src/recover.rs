//! Locks that a panic elsewhere cannot break: a thread that panicked while holding one (in a
//! scrape, the owner scan, a handler) leaves it poisoned, and `lock().unwrap()` would then
//! panic in every later scrape. The data behind each of qtrace's locks is replaced whole or
//! pushed to, never left half-written, so the guard is taken back and the poison cleared.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| {
        m.clear_poison();
        poisoned.into_inner()
    })
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| {
        l.clear_poison();
        poisoned.into_inner()
    })
}

pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| {
        l.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_locked_does_not_break_later_locks() {
        let m = Mutex::new(1);
        let l = RwLock::new(2);
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let _g = m.lock().unwrap();
                let _w = l.write().unwrap();
                panic!("a scrape panicked");
            })
            .join()
        });
        assert!(m.is_poisoned() && l.is_poisoned());
        assert_eq!(*lock(&m), 1);
        assert_eq!(*read(&l), 2);
        *write(&l) = 3;
        assert!(!m.is_poisoned() && !l.is_poisoned());
    }
}
