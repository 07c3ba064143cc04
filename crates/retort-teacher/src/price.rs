//! What requests cost: prices from the recipe or a built-in table, and the budget cap.

use std::sync::Mutex;

use retort_recipe::schema::teacher::{Price, Provider};

use crate::completion::Usage;
use crate::error::TeacherError;

/// Built-in list prices in US dollars per million tokens (input, output, cached input), as published
/// by the providers in late 2025. A recipe's `teacher.price` always wins; check your provider's page.
const TABLE: &[(&str, f64, f64, f64)] = &[
    ("gpt-5-nano", 0.05, 0.40, 0.005),
    ("gpt-5-mini", 0.25, 2.00, 0.025),
    ("gpt-5", 1.25, 10.00, 0.125),
    ("gpt-4.1-nano", 0.10, 0.40, 0.025),
    ("gpt-4.1-mini", 0.40, 1.60, 0.10),
    ("gpt-4.1", 2.00, 8.00, 0.50),
    ("gpt-4o-mini", 0.15, 0.60, 0.075),
    ("gpt-4o", 2.50, 10.00, 1.25),
    ("claude-haiku-4-5", 1.00, 5.00, 0.10),
    ("claude-3-5-haiku", 0.80, 4.00, 0.08),
    ("claude-sonnet-4-5", 3.00, 15.00, 0.30),
    ("claude-sonnet-4", 3.00, 15.00, 0.30),
    ("claude-opus-4-1", 15.00, 75.00, 1.50),
    ("claude-opus-4", 15.00, 75.00, 1.50),
];

/// The price of a model from the built-in table: the longest entry the name starts with, so dated
/// snapshots (`gpt-4o-mini-2024-07-18`) match.
pub fn builtin_price(model: &str) -> Option<Price> {
    TABLE.iter().filter(|(name, ..)| model.starts_with(name)).max_by_key(|(name, ..)| name.len()).map(
        |&(_, input, output, cached)| Price {
            input_per_mtok: input,
            output_per_mtok: output,
            cached_input_per_mtok: Some(cached),
            batch_discount: 0.5,
        },
    )
}

/// Resolved pricing for one teacher.
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    /// Per-million-token prices; `None` when unknown (costs are then reported as 0).
    pub price: Option<Price>,
    /// Requests go through a batch API (discounted).
    pub batch: bool,
}

impl Pricing {
    /// The recipe's price, else the table's, else none. A budget needs a price, except for replay,
    /// which costs nothing.
    pub fn resolve(
        provider: Provider,
        model: &str,
        price: Option<&Price>,
        batch: bool,
        budget: Option<f64>,
    ) -> Result<Pricing, TeacherError> {
        let price = match provider {
            Provider::Replay => Some(Price { batch_discount: 1.0, ..Price::default() }),
            _ => price.cloned().or_else(|| builtin_price(model)),
        };
        if price.is_none() && budget.is_some() {
            return Err(TeacherError::Config {
                message: format!("`teacher.budget_usd` is set but retort has no price for the model `{model}`"),
                hint: "add `price = { input_per_mtok = ..., output_per_mtok = ... }` under `[teacher]` (US dollars per million tokens, from your provider's price page)".into(),
            });
        }
        Ok(Pricing { price, batch })
    }

    /// What `usage` costs.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let Some(p) = &self.price else { return 0.0 };
        let cached = p.cached_input_per_mtok.unwrap_or(p.input_per_mtok);
        let raw = (usage.input_tokens as f64 * p.input_per_mtok
            + usage.cached_input_tokens as f64 * cached
            + usage.output_tokens as f64 * p.output_per_mtok)
            / 1e6;
        if self.batch { raw * p.batch_discount } else { raw }
    }

    /// The most a request with this many input tokens and this `max_tokens` can cost.
    pub fn worst_case(&self, input_tokens: u64, max_tokens: u32) -> f64 {
        self.cost(&Usage { input_tokens, output_tokens: max_tokens.into(), cached_input_tokens: 0 })
    }
}

#[derive(Debug, Default)]
struct Ledger {
    spent: f64,
    reserved: f64,
}

/// A hard spending cap. Every send first reserves its worst case; the reservation becomes the real
/// cost when the answer arrives.
#[derive(Debug)]
pub struct Budget {
    cap: Option<f64>,
    ledger: Mutex<Ledger>,
}

impl Budget {
    /// A cap (or none) with `spent` already paid by earlier runs.
    pub fn new(cap: Option<f64>, spent: f64) -> Budget {
        Budget { cap, ledger: Mutex::new(Ledger { spent, reserved: 0.0 }) }
    }

    /// Reserves `worst` dollars or refuses when the cap could be exceeded.
    pub fn reserve(&self, worst: f64) -> Result<(), TeacherError> {
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cap) = self.cap
            && l.spent + l.reserved + worst > cap
        {
            return Err(TeacherError::Budget { cap, spent: l.spent, reserved: l.reserved, next: worst });
        }
        l.reserved += worst;
        Ok(())
    }

    /// Reserves the longest prefix of `worst` that fits under the cap, as one reservation: how many
    /// fit, the dollars reserved, and the refusal for the rest (if any was refused).
    pub fn reserve_prefix(&self, worst: &[f64]) -> (usize, f64, Option<TeacherError>) {
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = 0.0;
        let mut fit = 0;
        for w in worst {
            if let Some(cap) = self.cap
                && l.spent + l.reserved + sum + w > cap
            {
                let refusal =
                    TeacherError::Budget { cap, spent: l.spent, reserved: l.reserved + sum, next: *w };
                l.reserved += sum;
                return (fit, sum, Some(refusal));
            }
            sum += w;
            fit += 1;
        }
        l.reserved += sum;
        (fit, sum, None)
    }

    /// Reserves `worst` dollars even past the cap: money an earlier run already committed (a
    /// submitted batch), which later sends must leave room for.
    pub fn commit(&self, worst: f64) {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).reserved += worst;
    }

    /// Turns a reservation into the real cost (`None`: the request was never answered).
    pub fn settle(&self, worst: f64, actual: Option<f64>) {
        let mut l = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        l.reserved = (l.reserved - worst).max(0.0);
        l.spent += actual.unwrap_or(0.0);
    }

    /// Dollars spent, this run and earlier ones.
    pub fn spent(&self) -> f64 {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).spent
    }

    /// The cap.
    pub fn cap(&self) -> Option<f64> {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_matches_dated_snapshots_by_the_longest_prefix() {
        assert_eq!(builtin_price("gpt-4o-mini-2024-07-18").unwrap().input_per_mtok, 0.15);
        assert_eq!(builtin_price("gpt-4o-2024-08-06").unwrap().input_per_mtok, 2.5);
        assert_eq!(builtin_price("gpt-5-mini").unwrap().output_per_mtok, 2.0);
        assert!(builtin_price("my-local-model").is_none());
    }

    #[test]
    fn costs_apply_cached_and_batch_prices() {
        let price = Price {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
            cached_input_per_mtok: Some(0.3),
            batch_discount: 0.5,
        };
        let p = Pricing::resolve(Provider::Anthropic, "x", Some(&price), false, Some(1.0)).unwrap();
        let u = Usage { input_tokens: 1_000_000, output_tokens: 1_000_000, cached_input_tokens: 1_000_000 };
        assert!((p.cost(&u) - 18.3).abs() < 1e-9);
        let b = Pricing { batch: true, ..p };
        assert!((b.cost(&u) - 9.15).abs() < 1e-9);
    }

    #[test]
    fn a_budget_without_a_price_is_refused() {
        let e = Pricing::resolve(Provider::OpenaiCompatible, "local", None, false, Some(5.0)).unwrap_err();
        assert!(e.to_string().contains("no price for the model `local`"), "{e}");
        assert!(Pricing::resolve(Provider::OpenaiCompatible, "local", None, false, None).is_ok());
    }

    #[test]
    fn the_budget_counts_reservations_and_settles_to_the_real_cost() {
        let b = Budget::new(Some(1.0), 0.5);
        b.reserve(0.3).unwrap();
        let e = b.reserve(0.3).unwrap_err();
        assert!(matches!(e, TeacherError::Budget { .. }), "{e}");
        b.settle(0.3, Some(0.1));
        assert!((b.spent() - 0.6).abs() < 1e-12);
        b.reserve(0.4).unwrap();
        b.settle(0.4, None);
        assert!((b.spent() - 0.6).abs() < 1e-12);
        // A batch reserves the part of it that fits, and the rest is refused.
        let (fit, reserved, refusal) = b.reserve_prefix(&[0.1, 0.2, 0.3]);
        assert_eq!(fit, 2);
        assert!((reserved - 0.3).abs() < 1e-12);
        assert!(matches!(refusal, Some(TeacherError::Budget { .. })));
        b.settle(reserved, Some(0.05));
        assert!((b.spent() - 0.65).abs() < 1e-12);
        assert_eq!(Budget::new(None, 0.0).reserve_prefix(&[1e9, 1e9]).0, 2);
    }
}
