//! Percentiles over latency samples.
//!
//! Nearest-rank percentiles (the smallest sample with at least p% of the
//! samples at or below it): every reported number is a latency that was
//! actually observed, never an interpolation between two.

use std::time::Duration;

/// The nearest-rank `p`-th percentile (0 < p ≤ 100) of `sorted`, which must
/// be in ascending order. `None` for no samples.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The shape of a set of latencies.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub count: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Summary {
    /// Summarises `samples` (sorted in place).
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let count = samples.len();
        if count == 0 {
            return Self::default();
        }
        let total: Duration = samples.iter().sum();
        let at = |p| percentile(samples, p).unwrap_or_default();
        Self {
            count,
            min: samples[0],
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: samples[count - 1],
            mean: total / count as u32,
        }
    }
}

/// Milliseconds with three decimals, for tables and CSV.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Microseconds, whole, for tables and CSV.
pub fn us(d: Duration) -> String {
    format!("{}", d.as_micros())
}

/// The median of `values[i] / floors[i]`, pairing each measurement with
/// the floor measured in the same round; `None` without a floor.
pub fn median_ratio(values: &[f64], floors: &[f64]) -> Option<f64> {
    let mut ratios: Vec<f64> = values
        .iter()
        .zip(floors)
        .filter(|(_, f)| **f > 0.0)
        .map(|(v, f)| v / f)
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_observed_samples() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        let v = [10u32, 20, 30];
        // 50% of 3 samples is rank 2 (ceil 1.5).
        assert_eq!(percentile(&v, 50.0), Some(20));
        // 99% of 3 samples: the largest.
        assert_eq!(percentile(&v, 99.0), Some(30));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
    }

    #[test]
    fn small_sets_report_their_maximum_as_p99() {
        let mut v: Vec<Duration> = (1..=20).rev().map(Duration::from_millis).collect();
        let s = Summary::of(&mut v);
        assert_eq!(s.count, 20);
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.p50, Duration::from_millis(10));
        assert_eq!(s.p99, Duration::from_millis(20));
        assert_eq!(s.max, Duration::from_millis(20));
        assert_eq!(s.mean, Duration::from_micros(10_500));
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(Summary::of(&mut []), Summary::default());
    }

    #[test]
    fn ratios_and_units() {
        // Rounds 2 and 3 ran slower for everything; pairing cancels it.
        assert_eq!(
            median_ratio(&[90.0, 45.0, 46.0], &[100.0, 50.0, 50.0]),
            Some(0.9)
        );
        assert_eq!(median_ratio(&[1.0], &[0.0]), None);
        assert_eq!(ms(Duration::from_micros(1500)), "1.500");
        assert_eq!(us(Duration::from_micros(1500)), "1500");
    }
}
