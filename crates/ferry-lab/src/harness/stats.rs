//! Summaries of a benchmark's samples: median, percentiles, min / median / max.

/// The value `percent` % of the way up the sorted values (50: the median, 100: the
/// largest); 0 when there are none.
pub fn percentile(values: impl IntoIterator<Item = f64>, percent: usize) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[(values.len() * percent / 100).min(values.len() - 1)]
}

/// The middle value (the upper one of an even count); 0 when there are none.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    percentile(values, 50)
}

/// The largest value; 0 when there are none.
pub fn maximum(values: impl IntoIterator<Item = f64>) -> f64 {
    percentile(values, 100)
}

/// `min / median / max` of the values present, `-` when none is.
pub fn spread(values: impl Iterator<Item = Option<u64>>) -> String {
    let mut values: Vec<u64> = values.flatten().collect();
    if values.is_empty() {
        return "-".into();
    }
    values.sort_unstable();
    format!(
        "{} / {} / {}",
        values[0],
        values[values.len() / 2],
        values[values.len() - 1]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_upper_middle() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn percentiles_index_the_sorted_values() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(values.iter().copied(), 95), 20.0);
        assert_eq!(percentile(values.iter().copied(), 50), 11.0);
        assert_eq!(maximum(values), 20.0);
    }

    #[test]
    fn the_spread_leaves_out_missing_values() {
        assert_eq!(
            spread([Some(3), None, Some(1), Some(2)].into_iter()),
            "1 / 2 / 3"
        );
        assert_eq!(spread([None].into_iter()), "-");
    }
}
