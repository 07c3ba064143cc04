//! Learning-rate schedules as transformers defines them (`get_cosine_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup`, `get_constant_schedule_with_warmup`, and the min-lr variant of
//! cosine): the rate used for the update of step `i` (0-based) is `lr * factor(i)`.

use retort_recipe::schema::train::Schedule;

/// A schedule over a known number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Shape after warmup.
    pub kind: Schedule,
    /// Warmup steps.
    pub warmup: u64,
    /// All steps.
    pub total: u64,
    /// Floor of the decay, as a fraction of `lr`.
    pub min_ratio: f64,
}

impl LrSchedule {
    /// Warmup steps from the recipe: `warmup_steps`, else `ceil(warmup_ratio * total)` (as transformers'
    /// `get_warmup_steps`).
    pub fn warmup_steps(total: u64, ratio: f64, steps: Option<u64>) -> u64 {
        steps.unwrap_or_else(|| (ratio * total as f64).ceil() as u64)
    }

    /// The rate for the update of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        let (w, t) = (self.warmup, self.total.max(1));
        if step < w {
            return self.lr * step as f64 / w.max(1) as f64;
        }
        let progress = (step - w) as f64 / (t.saturating_sub(w)).max(1) as f64;
        let decay = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        };
        let factor = match self.kind {
            Schedule::Constant => 1.0,
            _ => self.min_ratio + (1.0 - self.min_ratio) * decay,
        };
        self.lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup_matches_transformers() {
        // transformers: get_cosine_schedule_with_warmup(opt, 3, 10) with lr 1e-3, factors for steps
        // 0..10: 0, 1/3, 2/3, then 0.5 (1 + cos(pi (s - 3) / 7)).
        let s = LrSchedule { lr: 1e-3, kind: Schedule::Cosine, warmup: 3, total: 10, min_ratio: 0.0 };
        let expect =
            [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 0.950484, 0.811745, 0.611260, 0.388740, 0.188255, 0.049516];
        for (i, e) in expect.iter().enumerate() {
            assert!((s.at(i as u64) / 1e-3 - e).abs() < 1e-6, "step {i}: {}", s.at(i as u64) / 1e-3);
        }
        assert_eq!(LrSchedule::warmup_steps(100, 0.03, None), 3);
        assert_eq!(LrSchedule::warmup_steps(10, 0.03, None), 1);
        assert_eq!(LrSchedule::warmup_steps(100, 0.03, Some(7)), 7);
    }

    #[test]
    fn linear_constant_and_floor() {
        let lin = LrSchedule { lr: 1.0, kind: Schedule::Linear, warmup: 0, total: 4, min_ratio: 0.0 };
        assert_eq!((0..4).map(|i| lin.at(i)).collect::<Vec<_>>(), [1.0, 0.75, 0.5, 0.25]);
        let c = LrSchedule { lr: 2.0, kind: Schedule::Constant, warmup: 2, total: 4, min_ratio: 0.5 };
        assert_eq!((0..4).map(|i| c.at(i)).collect::<Vec<_>>(), [0.0, 1.0, 2.0, 2.0]);
        let floor = LrSchedule { lr: 1.0, kind: Schedule::Cosine, warmup: 0, total: 2, min_ratio: 0.1 };
        assert!((floor.at(1) - 0.55).abs() < 1e-12);
    }
}
