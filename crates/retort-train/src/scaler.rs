//! Dynamic loss scaling for a base in f16 (GPUs without bf16), as `torch.amp.GradScaler` does it.
//!
//! f16 keeps 5 exponent bits: its smallest normal value is 6.1e-5. The gradient of a mean loss over a
//! few thousand label tokens with respect to each logit is about `1 / (tokens x vocabulary)`, and the
//! gradients flowing back through the base's f16 activations are of that order, so most of them
//! would round to zero or to a few bits. The loss is therefore multiplied by a large scale before the
//! backward pass and the adapters' gradients (f32) divided by it afterwards. When the scaled
//! gradients overflow (an infinite or NaN gradient) the step is skipped and the scale halved; after
//! [`GROWTH_INTERVAL`] good steps in a row it doubles. torch's defaults: initial scale 2^16, factor 2,
//! interval 2000.

use serde::{Deserialize, Serialize};

/// The scale a run starts from.
pub const INITIAL_SCALE: f64 = 65_536.0;
/// Good steps in a row after which the scale doubles.
pub const GROWTH_INTERVAL: u32 = 2000;
/// Below this the scale stops shrinking: gradients that overflow at scale 1 are not an overflow of
/// the scaling but a diverged run, which the trainer's non-finite guard handles.
pub const MIN_SCALE: f64 = 1.0;

/// The scaler's state, saved in checkpoints so a resumed run continues with the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The factor the loss is multiplied by before the backward pass.
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u32,
}

/// What a step's gradients did to the scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Finite: apply the step.
    Apply,
    /// Not finite at a scale above [`MIN_SCALE`]: skip the step; the scale was halved.
    Overflow,
    /// Not finite at [`MIN_SCALE`]: the run itself produces non-finite values.
    NonFinite,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: INITIAL_SCALE, good_steps: 0 }
    }
}

impl LossScaler {
    /// Updates the scale after a step whose unscaled gradients were `finite` or not.
    pub fn update(&mut self, finite: bool) -> Verdict {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            return Verdict::Apply;
        }
        self.good_steps = 0;
        if self.scale <= MIN_SCALE {
            return Verdict::NonFinite;
        }
        self.scale = (self.scale / 2.0).max(MIN_SCALE);
        Verdict::Overflow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_doubles_after_the_interval_and_stops_at_one() {
        let mut s = LossScaler::default();
        assert_eq!(s.update(false), Verdict::Overflow);
        assert_eq!(s.scale, INITIAL_SCALE / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert_eq!(s.update(true), Verdict::Apply);
        }
        assert_eq!(s.scale, INITIAL_SCALE / 2.0, "not before the interval");
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (INITIAL_SCALE, 0), "doubled after the interval");
        // An overflow resets the count of good steps.
        s.update(true);
        s.update(false);
        assert_eq!(s.good_steps, 0);
        // Down to 1, then overflow is the run's own.
        let mut s = LossScaler { scale: 4.0, good_steps: 0 };
        assert_eq!(s.update(false), Verdict::Overflow);
        assert_eq!(s.update(false), Verdict::Overflow);
        assert_eq!(s.scale, MIN_SCALE);
        assert_eq!(s.update(false), Verdict::NonFinite);
        assert_eq!(s.scale, MIN_SCALE);
    }
}
