//! The one percentile definition of sheepdog: `/status`, the hedging delay, `sheepdog report` and `/api/stats`
//! all compute quantiles with [`percentile`], so the same latencies give the same p95 everywhere.
//!
//! Pure: slices in, numbers out.

/// The `q`-quantile (`q` clamped to 0..=1; NaN means the median) of an ascending slice, interpolated linearly
/// between the two closest ranks (`rank = q × (n − 1)`, numpy's and Prometheus' `quantile` default). `None`
/// for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
    let rank = q * last as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let (a, b) = (*sorted.get(lo)?, *sorted.get(hi)?);
    Some(a + (b - a) * (rank - lo as f64))
}

/// Sort finite values ascending in place (NaN and infinities are dropped first), ready for [`percentile`].
pub fn sort_finite(values: &mut Vec<f64>) {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_between_closest_ranks() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.5), Some(50.5));
        assert!((percentile(&v, 0.95).unwrap() - 95.05).abs() < 1e-9);
        assert_eq!(percentile(&[10.0, 20.0], 0.25), Some(12.5));
        assert_eq!(percentile(&[10.0, 20.0], f64::NAN), Some(15.0));
        assert_eq!(percentile(&[10.0, 20.0], 7.0), Some(20.0));
    }

    #[test]
    fn sort_finite_drops_non_numbers() {
        let mut v = vec![3.0, f64::NAN, 1.0, f64::INFINITY, 2.0];
        sort_finite(&mut v);
        assert_eq!(v, vec![1.0, 2.0, 3.0]);
    }
}
