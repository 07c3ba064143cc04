//! "Did you mean" suggestions for misspelled keys and values.

/// The closest candidate to `word`, if one is close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lowered = word.to_ascii_lowercase().replace('-', "_");
    candidates
        .into_iter()
        .map(|c| {
            let norm = c.to_ascii_lowercase().replace('-', "_");
            let score = if norm == lowered { 1.0 } else { strsim::jaro_winkler(&lowered, &norm) };
            (score, c)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn suggests_near_names_only() {
        let keys = ["lr", "epochs", "max_seq_len", "micro_batch_size"];
        assert_eq!(did_you_mean("epoch", keys), Some("epochs"));
        assert_eq!(did_you_mean("max_seq_length", keys), Some("max_seq_len"));
        assert_eq!(did_you_mean("micro-batch-size", keys), Some("micro_batch_size"));
        assert_eq!(did_you_mean("banana", keys), None);
    }
}
