//! safetensors files of plain tensors: read only from regular files within a memory
//! limit, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use std::io::{Read, Write};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{IoError, MemoryError};
use crate::memory::MemoryLimit;
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
    /// Reads a safetensors file within the memory limit of the environment
    /// ([`MemoryLimit::from_env`]); see [`TensorFile::read_limited`].
    pub fn read(path: &Path) -> Result<Self, IoError> {
        let limit = MemoryLimit::from_env().map_err(|source| IoError::Memory {
            path: path.to_path_buf(),
            source,
        })?;
        Self::read_limited(path, &limit)
    }

    /// Reads a safetensors file; F32, F64 and F16 tensors are converted to `f32`.
    ///
    /// Only a regular file is opened (a FIFO, directory or device is an error, never a
    /// hang), and a file whose bytes plus decoded tensors exceed `limit` is refused before
    /// its tensors are allocated.
    pub fn read_limited(path: &Path, limit: &MemoryLimit) -> Result<Self, IoError> {
        let bytes = read_regular_file(path, limit)?;
        Self::decode_limited(&bytes, limit).map_err(|error| match error {
            DecodeError::Format(message) => IoError::Format {
                path: path.to_path_buf(),
                message,
            },
            DecodeError::Memory(source) => IoError::Memory {
                path: path.to_path_buf(),
                source,
            },
        })
    }

    /// Parses safetensors bytes; the error says what was wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        Self::from_bytes_limited(bytes, &MemoryLimit::new(u64::MAX))
    }

    /// Parses safetensors bytes, refusing (before allocating them) decoded tensors that
    /// together with `bytes` would exceed `limit`.
    pub fn from_bytes_limited(bytes: &[u8], limit: &MemoryLimit) -> Result<Self, String> {
        Self::decode_limited(bytes, limit).map_err(|error| match error {
            DecodeError::Format(message) => message,
            DecodeError::Memory(source) => source.to_string(),
        })
    }

    fn decode_limited(bytes: &[u8], limit: &MemoryLimit) -> Result<Self, DecodeError> {
        let header_len = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| {
                DecodeError::Format(
                    "not a safetensors file: shorter than its 8-byte header length".into(),
                )
            })?;
        // The JSON header becomes maps, strings and shape vectors: allow several times
        // its size before parsing it, so a header of absurd length is refused unparsed.
        let parse_need = header_len
            .checked_mul(HEADER_PARSE_FACTOR)
            .and_then(|h| h.checked_add(bytes.len() as u64));
        limit
            .check(
                &format!("parsing a safetensors header of {header_len} bytes"),
                parse_need,
                "is this a safetensors file?",
            )
            .map_err(DecodeError::Memory)?;
        let (header_len, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| DecodeError::Format(format!("not a safetensors file: {e}")))?;
        let data_start = header_len.saturating_add(8);
        let infos = meta.tensors();
        let decoded = infos.values().try_fold(0u64, |sum, info| {
            let elements = info
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))?;
            sum.checked_add(elements.checked_mul(4)?)
        });
        let need = decoded
            .and_then(|d| d.checked_add(bytes.len() as u64))
            .and_then(|d| d.checked_add(header_len as u64));
        limit
            .check(
                "decoding its tensors to f32 (F16 doubles in size)",
                need,
                "a smaller file",
            )
            .map_err(DecodeError::Memory)?;
        let mut tensors = BTreeMap::new();
        for (name, info) in infos {
            let (start, end) = info.data_offsets;
            let data = start
                .checked_add(data_start)
                .zip(end.checked_add(data_start))
                .and_then(|(s, e)| bytes.get(s..e))
                .ok_or_else(|| {
                    DecodeError::Format(format!("tensor `{name}`: data outside the file"))
                })?;
            let values = decode(info.dtype, data).ok_or_else(|| {
                DecodeError::Format(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    info.dtype
                ))
            })?;
            let t = HostTensor::new(&info.shape, values)
                .map_err(|e| DecodeError::Format(format!("tensor `{name}`: {e}")))?;
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

/// Why decoding failed: the bytes, or the memory they would need.
enum DecodeError {
    Format(String),
    Memory(MemoryError),
}

/// Bytes of parsed structures allowed per byte of safetensors JSON header.
const HEADER_PARSE_FACTOR: u64 = 16;

/// What a non-regular file is, for messages.
fn kind_of(file_type: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() || file_type.is_block_device() {
            return "a device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file, with its metadata.
///
/// The type is checked before opening (opening a FIFO for reading blocks until a writer
/// comes, and a directory or device is no data file); on unix the file is opened
/// non-blocking and checked again, so a FIFO swapped in between cannot hang either.
pub fn open_regular_file(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), IoError> {
    let io = |source| IoError::Io {
        path: path.to_path_buf(),
        source,
    };
    let not_regular = |file_type| IoError::Format {
        path: path.to_path_buf(),
        message: format!("{}, expected a regular file", kind_of(file_type)),
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok((file, meta))
}

/// The bytes of `path`, which must be a regular file ([`open_regular_file`]) no larger
/// than `limit`.
///
/// The size is checked before reading, and reading stops past the limit in case the
/// file grows meanwhile.
pub fn read_regular_file(path: &Path, limit: &MemoryLimit) -> Result<Vec<u8>, IoError> {
    let too_large = |source| IoError::Memory {
        path: path.to_path_buf(),
        source,
    };
    let (file, meta) = open_regular_file(path)?;
    let what = "reading the file";
    let hint = "is it the right file?";
    limit
        .check(what, Some(meta.len()), hint)
        .map_err(too_large)?;
    let capacity = usize::try_from(meta.len()).unwrap_or(0);
    let mut bytes = Vec::with_capacity(capacity);
    file.take(limit.bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| IoError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    limit
        .check(what, Some(bytes.len() as u64), hint)
        .map_err(too_large)?;
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
///
/// On every failure the temporary is removed and `path` is untouched: a result is either
/// complete under its name or absent, never a zero-byte or partial file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let io = |source| IoError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = temporary_path(path);
    let written = write_and_sync(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        // Best effort: the write error is the one worth reporting.
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// The temporary beside `path` that an atomic write goes through: `.NAME.PID.tmp`, hidden,
/// and recognisable by its pattern so that a later run can remove one a killed process
/// left behind.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Creates `path`, writes all of `bytes` and flushes them to disk, so a full disk is
/// reported here and not discovered after the rename.
fn write_and_sync(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
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

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nca-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn sample() -> TensorFile {
        let mut f = TensorFile::default();
        let t = HostTensor::new(&[2, 2], vec![1.0, -2.0, 3.5, 0.25]).expect("4 elements");
        f.tensors.insert("x".into(), t);
        f
    }

    /// Reads `path` on another thread, so a read that blocks fails the test instead of
    /// hanging it.
    fn read_within_seconds(path: &Path) -> Result<TensorFile, IoError> {
        let (send, receive) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            send.send(TensorFile::read_limited(&path, &MemoryLimit::new(1 << 30)))
        });
        receive
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading must not block")
    }

    #[test]
    fn only_regular_files_are_read_and_a_fifo_never_blocks() {
        let dir = scratch_dir("kinds");
        let err = read_within_seconds(&dir).expect_err("a directory is refused");
        assert!(
            err.to_string()
                .contains("a directory, expected a regular file"),
            "{err}"
        );
        #[cfg(unix)]
        {
            let fifo = dir.join("fifo.safetensors");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo");
            let err = read_within_seconds(&fifo).expect_err("a FIFO is refused");
            assert!(
                err.to_string().contains("a FIFO, expected a regular file"),
                "{err}"
            );
            assert!(err.to_string().contains("fifo.safetensors"), "{err}");
        }
        let file = dir.join("ok.safetensors");
        sample().write(&file).expect("write");
        assert_eq!(
            read_within_seconds(&file).expect("a regular file reads"),
            sample()
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_file_larger_than_the_limit_is_refused_before_reading() {
        let dir = scratch_dir("limit");
        let file = dir.join("big.safetensors");
        let mut big = TensorFile::default();
        big.tensors.insert("x".into(), HostTensor::zeros(&[1000]));
        big.write(&file).expect("write");
        let bytes = std::fs::read(&file).expect("bytes");
        let size = bytes.len() as u64;
        let err = TensorFile::read_limited(&file, &MemoryLimit::new(size - 1))
            .expect_err("over the limit");
        assert!(matches!(err, IoError::Memory { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("big.safetensors: reading the file needs"),
            "{err}"
        );
        // Decoding needs the bytes plus the tensors: the file size alone is not enough.
        let mut header_len = [0u8; 8];
        header_len.copy_from_slice(&bytes[..8]);
        let parse_need = u64::from_le_bytes(header_len) * HEADER_PARSE_FACTOR + size;
        let err =
            TensorFile::read_limited(&file, &MemoryLimit::new(parse_need)).expect_err("decoding");
        assert!(err.to_string().contains("decoding its tensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_header_declaring_an_absurd_length_is_refused_unparsed() {
        let mut bytes = sample().to_bytes().expect("bytes");
        bytes[..8].copy_from_slice(&(90_000_000u64).to_le_bytes());
        let err = TensorFile::from_bytes_limited(&bytes, &MemoryLimit::new(64 << 20))
            .expect_err("absurd header");
        assert!(
            err.contains("parsing a safetensors header of 90000000 bytes"),
            "{err}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_failed_write_leaves_neither_temporary_nor_result() {
        let dir = scratch_dir("full");
        let path = dir.join("c.safetensors");
        // The temporary's name, pointing at a device that is always full (ENOSPC).
        let tmp = dir.join(format!(".c.safetensors.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink("/dev/full", &tmp).expect("symlink");
        let err = sample().write(&path).expect_err("the disk is full");
        assert!(err.to_string().contains("c.safetensors"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&dir).expect("list").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        std::fs::remove_dir_all(&dir).ok();
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
