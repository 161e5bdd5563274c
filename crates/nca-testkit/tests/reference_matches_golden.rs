//! The f64 reference used for finite differences reproduces the golden vectors itself.
#![allow(clippy::unwrap_used)]

use nca_testkit::checks::Golden;
use nca_testkit::{reference, Tolerance};

#[test]
fn reference_reproduces_every_golden_file() {
    for name in ["golden_6x7_nopos", "golden_5x5_pos", "golden_4x9_hidden"] {
        let g = Golden::load(name);
        let w = g.weights();
        let out = reference::forward(&w, g.tensor("state"));
        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let expect = |n: &str| {
            g.tensor(n)
                .data()
                .iter()
                .map(|&x| f64::from(x))
                .collect::<Vec<_>>()
        };
        Tolerance::FORWARD.assert_close(name, &to32(&out.update), &expect("update"));
        Tolerance::FORWARD.assert_close(name, &to32(&out.attention), &expect("attention"));
        let loss = reference::loss(&w, g.tensor("state"), g.tensor("target"));
        Tolerance::FORWARD.assert_close(name, &[loss as f32], &expect("loss"));
        let numeric =
            reference::numerical_gradients(&w, g.tensor("state"), g.tensor("target"), 1e-2);
        for ((n, fd), (_, e)) in numeric.into_iter().zip(g.gradients().named()) {
            Tolerance {
                abs: 2e-5,
                rel: 1e-3,
            }
            .assert_close(&format!("{name} grad.{n}"), &to32(&fd), &expect_t(e));
        }
    }
}

fn expect_t(t: &nca_api::HostTensor) -> Vec<f64> {
    t.data().iter().map(|&x| f64::from(x)).collect()
}
