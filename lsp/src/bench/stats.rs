//! The bench's statistics: the median and spread of repeated runs, percentiles, and numbers as the
//! JSON report rounds them.

use std::time::Duration;

use serde_json::{json, Value};

/// Median and range of repeated measurements.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        Spread {
            median: phi_engine::synthetic::median(sorted.clone()),
            min: sorted[0],
            max: sorted[n - 1],
            n,
        }
    }

    /// The `p`-th percentile (0..=100), nearest rank.
    pub fn percentile(values: &[f64], p: f64) -> f64 {
        let mut sorted: Vec<f64> = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank.min(sorted.len()) - 1]
    }

    pub fn json(&self) -> Value {
        json!({"median": round(self.median), "min": round(self.min), "max": round(self.max), "n": self.n})
    }
}

/// `x` to three decimals, or null where it is not a number.
pub fn round(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_percentiles() {
        let s = Spread::of(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(&[1.0, 2.0, 3.0, 4.0]).median, 2.5);
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Spread::percentile(&values, 50.0), 5.0);
        assert_eq!(Spread::percentile(&values, 90.0), 9.0);
        assert!(Spread::percentile(&[], 50.0).is_nan());
    }
}
