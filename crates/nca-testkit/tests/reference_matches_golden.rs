//! The f64 reference used for finite differences reproduces the golden vectors itself,
//! and `nca_api::position::features` reproduces the files' position features.
#![allow(clippy::unwrap_used)]

use nca_api::position;
use nca_testkit::checks::{Golden, GOLDEN_FILES};
use nca_testkit::{reference, Tolerance};

fn to64(t: &nca_api::HostTensor) -> Vec<f64> {
    t.data().iter().map(|&x| f64::from(x)).collect()
}

#[test]
fn reference_reproduces_every_golden_file() {
    assert_eq!(GOLDEN_FILES.len(), 7);
    for name in GOLDEN_FILES {
        let g = Golden::load(name);
        let (m, w) = (&g.model, g.weights());
        let (state, target) = (g.tensor("state"), g.tensor("target"));
        let out = reference::forward(m, &w, state);
        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let expect = |n: &str| to64(g.tensor(n));
        Tolerance::FORWARD.assert_close(name, &to32(&out.update), &expect("update"));
        Tolerance::FORWARD.assert_close(name, &to32(&out.attention), &expect("attention"));
        let loss = reference::loss(m, &w, state, target);
        Tolerance::FORWARD.assert_close(name, &[loss as f32], &expect("loss"));
        let numeric = reference::numerical_gradients(m, &w, state, target, 1e-3);
        let expected = g.gradients();
        assert_eq!(
            numeric.len(),
            expected.named().len(),
            "{name}: gradient count"
        );
        for ((n, fd), (e_name, e)) in numeric.into_iter().zip(expected.named()) {
            assert_eq!(n, e_name);
            Tolerance {
                abs: 2e-5,
                rel: 1e-3,
            }
            .assert_close(&format!("{name} grad.{n}"), &to32(&fd), &to64(e));
        }
    }
}

#[test]
fn position_features_match_the_golden_files() {
    let mut checked = 0;
    for name in GOLDEN_FILES {
        let g = Golden::load(name);
        let Some(l) = g.model.position_octaves else {
            assert!(!g.file.tensors.contains_key("position_features"), "{name}");
            continue;
        };
        let [_, _, h, w] = g.tensor("state").dims4("state").unwrap();
        let ours = position::features(l, h, w);
        let theirs = g.tensor("position_features");
        assert_eq!(ours.shape(), theirs.shape(), "{name}");
        Tolerance {
            abs: 1e-6,
            rel: 0.0,
        }
        .assert_close(name, ours.data(), &to64(theirs));
        checked += 1;
    }
    assert_eq!(checked, 3, "three golden files have position inputs");
}
