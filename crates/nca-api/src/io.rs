//! safetensors files of plain tensors, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::IoError;
use crate::tensor::HostTensor;

/// The tensors and string metadata of one safetensors file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// The file's `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads a safetensors file; F32, F64 and F16 tensors are converted to `f32`.
    pub fn read(path: &Path) -> Result<Self, IoError> {
        let bytes = std::fs::read(path).map_err(|source| IoError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|message| IoError::Format {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses safetensors bytes; the error says what was wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| format!("not a safetensors file: {e}"))?;
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let data = decode(view.dtype(), view.data()).ok_or_else(|| {
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())
            })?;
            let t =
                HostTensor::new(view.shape(), data).map_err(|e| format!("tensor `{name}`: {e}"))?;
            tensors.insert(name, t);
        }
        let metadata = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Self { tensors, metadata })
    }

    /// Serialises to safetensors bytes (all tensors as little-endian F32).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let raw: Vec<(&String, Vec<u8>, &[usize])> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                (
                    n,
                    t.data().iter().flat_map(|x| x.to_le_bytes()).collect(),
                    t.shape(),
                )
            })
            .collect();
        let mut views = Vec::with_capacity(raw.len());
        for (name, bytes, shape) in &raw {
            let view = TensorView::new(Dtype::F32, shape.to_vec(), bytes)
                .map_err(|e| format!("tensor `{name}`: {e}"))?;
            views.push((name.as_str(), view));
        }
        let meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
    }

    /// Writes the file atomically: a temporary file beside `path`, then a rename, so a
    /// crash never leaves a half-written file under the final name.
    pub fn write(&self, path: &Path) -> Result<(), IoError> {
        let bytes = self.to_bytes().map_err(|message| IoError::Format {
            path: path.to_path_buf(),
            message,
        })?;
        write_atomically(path, &bytes)
    }

    /// The tensor called `name`, or a format error naming it and the file.
    pub fn take(&mut self, name: &str, path: &Path) -> Result<HostTensor, IoError> {
        self.tensors.remove(name).ok_or_else(|| IoError::Format {
            path: path.to_path_buf(),
            message: format!("missing tensor `{name}`"),
        })
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let io = |source| IoError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp: PathBuf = path.to_path_buf();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tmp.set_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F64 => Some(
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        _ => None,
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal half: renormalise into an f32 exponent.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_bytes() {
        let mut f = TensorFile::default();
        let t = HostTensor::new(&[2, 2], vec![1.0, -2.0, 3.5, 0.25]).expect("4 elements");
        f.tensors.insert("x".into(), t);
        f.metadata.insert("k".into(), "v".into());
        let back = TensorFile::from_bytes(&f.to_bytes().expect("serialise")).expect("parse");
        assert_eq!(back, f);
    }

    #[test]
    fn garbage_is_a_format_error() {
        assert!(TensorFile::from_bytes(b"not a tensor file").is_err());
    }

    #[test]
    fn half_floats_decode() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }
}
