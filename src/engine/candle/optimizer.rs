//! The optimizers that step LoRA adapters, with state that a checkpoint saves and restores:
//! SGD, and AdamW as PyTorch's `torch.optim.AdamW` computes it (bias-corrected moments, `eps`
//! added after the square root, weight decay decoupled and applied first).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::error::Result;

/// The file an optimizer's state is saved in, beside the adapters.
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// What updates the adapters from their gradients.
pub enum Optimizer {
    /// `θ ← θ - lr · g`.
    Sgd { lr: f64 },
    /// AdamW's moments per tensor, by name, and the steps taken.
    AdamW { lr: f64, weight_decay: f64, step: u64, moments: HashMap<String, (Tensor, Tensor)> },
}

impl Optimizer {
    /// Applies one step to `vars` (by name) from `grads`; tensors without a gradient stay.
    pub fn step(&mut self, vars: &[(String, Var)], grads: &GradStore) -> Result<()> {
        match self {
            Self::Sgd { lr } => {
                for (_, var) in vars {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        var.set(&(var.as_tensor() - (g * *lr)?)?)?;
                    }
                }
            }
            Self::AdamW { lr, weight_decay, step, moments } => {
                *step += 1;
                let t = *step as i32;
                let (correct1, correct2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
                for (name, var) in vars {
                    let Some(g) = grads.get(var.as_tensor()) else { continue };
                    let (m, v) = match moments.remove(name) {
                        Some(mv) => mv,
                        None => (g.zeros_like()?, g.zeros_like()?),
                    };
                    let m = ((m * BETA1)? + (g * (1.0 - BETA1))?)?;
                    let v = ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                    let decayed = (var.as_tensor() * (1.0 - *lr * *weight_decay))?;
                    let denom = ((v.sqrt()? / correct2.sqrt())? + EPS)?;
                    let update = ((&m / denom)? * (*lr / correct1))?;
                    var.set(&(decayed - update)?)?;
                    moments.insert(name.clone(), (m, v));
                }
            }
        }
        Ok(())
    }

    /// Writes the state (AdamW's moments and step count) to `dir/optimizer.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let Self::AdamW { step, moments, .. } = self else { return Ok(()) };
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, (m, v)) in moments {
            tensors.insert(format!("{name}.exp_avg"), m.clone());
            tensors.insert(format!("{name}.exp_avg_sq"), v.clone());
        }
        tensors.insert("step".into(), Tensor::new(&[*step as f32], &Device::Cpu)?);
        candle_core::safetensors::save(&tensors, dir.join(OPTIMIZER_STATE))?;
        Ok(())
    }

    /// Restores the state saved in `dir`, if there is any.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(OPTIMIZER_STATE);
        let Self::AdamW { step, moments, .. } = self else { return Ok(()) };
        if !path.is_file() {
            return Ok(());
        }
        let mut stored = candle_core::safetensors::load(&path, &Device::Cpu)?;
        if let Some(saved) = stored.remove("step") {
            *step = saved.flatten_all()?.to_vec1::<f32>()?.first().copied().unwrap_or(0.0) as u64;
        }
        let names: Vec<String> =
            stored.keys().filter_map(|k| k.strip_suffix(".exp_avg").map(str::to_string)).collect();
        for name in names {
            let m = stored.remove(&format!("{name}.exp_avg")).expect("listed above");
            if let Some(v) = stored.remove(&format!("{name}.exp_avg_sq")) {
                moments.insert(name, (m, v));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adamw() -> Optimizer {
        Optimizer::AdamW { lr: 0.1, weight_decay: 0.0, step: 0, moments: HashMap::new() }
    }

    /// AdamW's first step moves each weight by `lr` against its gradient's sign; a restored
    /// optimizer then takes the same second step as one that never stopped.
    #[test]
    fn adamw_steps_and_resumes_exactly() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut optimizer = adamw();
        let loss = |var: &Var| (var.as_tensor().sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        optimizer.step(&vars, &loss(&var)).unwrap();
        let after_one: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((after_one[0] - 0.9).abs() < 1e-6 && (after_one[1] + 1.9).abs() < 1e-6, "{after_one:?}");

        let dir = std::env::temp_dir().join(format!("adamw-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        optimizer.save(&dir).unwrap();
        let twin = Var::new(after_one.as_slice(), &Device::Cpu).unwrap();
        let mut restored = adamw();
        restored.restore(&dir).unwrap();
        optimizer.step(&vars, &loss(&var)).unwrap();
        restored.step(&[("w".to_string(), twin.clone())], &loss(&twin)).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), twin.as_tensor().to_vec1::<f32>().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
