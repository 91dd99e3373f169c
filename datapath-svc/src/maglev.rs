//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each backend fills the lookup table along its own permutation of the
//! slots, taking turns, so every backend gets ⌊M/N⌋ or ⌈M/N⌉ slots, and
//! removing one backend leaves most other slots where they were. The table
//! depends only on the backend names, M and the seed, so every node builds
//! the same table and a flow hashes to the same backend wherever it lands.

/// Table sizes weft accepts: primes, as Maglev needs, spaced by about 2×.
pub const TABLE_SIZES: &[u32] = &[251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// Checks a configured table size.
pub fn validate_table_size(m: u32) -> Result<(), String> {
    if TABLE_SIZES.contains(&m) {
        Ok(())
    } else {
        Err(format!(
            "{m} is not a supported Maglev table size (a prime, one of {TABLE_SIZES:?})"
        ))
    }
}

/// 64-bit FNV-1a over the seed and the name, then a splitmix64 finaliser so
/// nearby names spread over the whole range.
fn hash(seed: u32, salt: u8, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed
        .to_le_bytes()
        .iter()
        .chain([salt].iter())
        .chain(name.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The lookup table of size `m` for `backends` (name, id). Names must be
/// unique; the order does not matter. Empty when there are no backends.
pub fn table(backends: &[(String, u32)], m: u32, seed: u32) -> Vec<u32> {
    if backends.is_empty() || m == 0 {
        return Vec::new();
    }
    let mut sorted: Vec<&(String, u32)> = backends.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let m64 = u64::from(m);
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(name, _)| {
            let offset = hash(seed, 0, name) % m64;
            let skip = hash(seed, 1, name) % (m64 - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut entry: Vec<Option<u32>> = vec![None; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = ((offset + next[i] * skip) % m64) as usize;
            while entry[c].is_some() {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m64) as usize;
            }
            entry[c] = Some(sorted[i].1);
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry.into_iter().map(|e| e.unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn backends(n: u32) -> Vec<(String, u32)> {
        (1..=n)
            .map(|i| (format!("10.244.{}.{}:8080", i / 200, i % 200), i))
            .collect()
    }

    #[test]
    fn every_backend_gets_its_share() {
        let t = table(&backends(10), 16381, 7);
        assert_eq!(t.len(), 16381);
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for id in &t {
            *counts.entry(*id).or_default() += 1;
        }
        assert_eq!(counts.len(), 10);
        for (_, c) in counts {
            assert!((1638..=1639).contains(&c), "{c} slots");
        }
    }

    #[test]
    fn the_table_is_the_same_whatever_the_order() {
        let mut b = backends(7);
        let a = table(&b, 1021, 1);
        b.reverse();
        assert_eq!(a, table(&b, 1021, 1));
        assert_ne!(a, table(&b, 1021, 2), "the seed changes the table");
    }

    /// Removing one of N backends must move the removed backend's slots
    /// (about 1/N) and, by the algorithm's design, only a few more.
    #[test]
    fn removing_one_backend_moves_little_else() {
        let all = backends(10);
        let before = table(&all, 16381, 3);
        let after = table(&all[..9], 16381, 3);
        let moved_other = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 10 && b != a)
            .count();
        let share = moved_other as f64 / before.len() as f64;
        assert!(
            share < 0.03,
            "{:.2}% of the surviving backends' slots moved",
            share * 100.0
        );
    }

    #[test]
    fn only_primes_are_accepted() {
        assert!(validate_table_size(16381).is_ok());
        assert!(validate_table_size(16384).is_err());
    }
}
