//! A bounds-checked reader for the header of a GGUF file.
//!
//! llama.cpp trusts the files it is given; a truncated download or a file of
//! the wrong kind can take it down with the whole process. Before a GGUF file
//! goes anywhere near llama.cpp, [`inspect`] reads its header with every
//! length and count checked against the size of the file, and checks that
//! the tensor data the header announces is really there. It also gives the
//! metadata the runtime reports (architecture, name, training context length)
//! without loading any weights.
//!
//! The layout (GGUF version 2 and 3, little-endian): magic `GGUF`, version
//! `u32`, tensor count `u64`, metadata count `u64`, the metadata key/value
//! pairs, the tensor descriptors (name, dimensions, type, offset), then the
//! tensor data, aligned to `general.alignment` (32 by default).

pub mod write;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the tensor data when the file does not say otherwise.
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml tensors have at most this many dimensions.
const MAX_DIMS: u32 = 4;

/// Strings longer than this are checked and skipped rather than kept.
const MAX_KEPT_STRING_BYTES: u64 = 1 << 20;

/// One metadata value, as far as the runtime keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (lossily decoded), or `None` when it was longer than 1 MiB and skipped.
    String(Option<String>),
    /// An array; its elements are checked but not kept.
    Array {
        /// The GGUF type id of the elements.
        element_type: u32,
        /// Number of elements.
        len: u64,
    },
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::Uint(v) => Some(v),
            MetaValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::Float(v) => Some(v),
            MetaValue::Uint(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is a kept string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(Some(s)) => Some(s),
            _ => None,
        }
    }
}

/// What the header of a valid GGUF file says.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Number of tensors in the file.
    pub tensor_count: u64,
    /// Total number of tensor elements (the parameter count).
    pub parameter_count: u64,
    /// Metadata key/value pairs (arrays summarised, not kept).
    pub metadata: BTreeMap<String, MetaValue>,
    /// Offset of the tensor data section in bytes.
    pub data_offset_bytes: u64,
    /// The size the file must have to hold all its tensors.
    pub needed_bytes: u64,
    /// The size of the file.
    pub file_bytes: u64,
    /// The tensor descriptors, in file order.
    pub tensors: Vec<TensorInfo>,
}

/// Where one tensor is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as ggml counts them.
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 3 Q4_1, 8 Q8_0, ...).
    pub ggml_type: u32,
    /// Offset of the data from the start of the file.
    pub offset_bytes: u64,
    /// Bytes of data (0 for a type this reader does not know).
    pub size_bytes: u64,
}

impl GgufSummary {
    /// `general.architecture` (e.g. `llama`, `qwen2`).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(MetaValue::as_str)
    }

    /// `general.name`, the model's human-readable name.
    pub fn name(&self) -> Option<&str> {
        self.metadata
            .get("general.name")
            .and_then(MetaValue::as_str)
    }

    /// `<arch>.context_length`, the context length the model was trained with.
    pub fn context_length(&self) -> Option<u64> {
        let arch = self.architecture()?;
        self.metadata
            .get(&format!("{arch}.context_length"))
            .and_then(MetaValue::as_u64)
    }

    /// `tokenizer.chat_template`, if the file carries one.
    pub fn chat_template(&self) -> Option<&str> {
        self.metadata
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
    }
}

/// Reads and checks the header of the GGUF file at `path`.
///
/// Fails with [`Error::NotGguf`] when the magic bytes are wrong,
/// [`Error::TruncatedGguf`] when the file ends before its header or its tensor
/// data, and [`Error::InvalidGguf`] for any other inconsistency.
pub fn inspect(path: &Path) -> Result<GgufSummary> {
    let file = File::open(path).map_err(Error::io(path))?;
    let file_bytes = file.metadata().map_err(Error::io(path))?.len();
    parse(BufReader::new(file), file_bytes, path)
}

/// Parses a GGUF header from `reader`, which holds `file_bytes` bytes in all.
pub(crate) fn parse<R: Read>(reader: R, file_bytes: u64, path: &Path) -> Result<GgufSummary> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
        file_bytes,
        path: path.to_path_buf(),
    };

    let magic = r.bytes_prefix(4)?;
    if magic != MAGIC {
        return Err(Error::NotGguf {
            path: r.path.clone(),
            magic,
        });
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(r.invalid(format!("unsupported gguf version {version}")));
    }
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    // Each metadata pair takes at least 12 bytes (key length and value type),
    // each tensor descriptor at least 24; a count beyond what the file could
    // hold is corrupt, and checking it first keeps allocations bounded.
    if kv_count > file_bytes / 12 {
        return Err(r.invalid(format!("metadata count {kv_count} cannot fit in the file")));
    }
    if tensor_count > file_bytes / 24 {
        return Err(r.invalid(format!(
            "tensor count {tensor_count} cannot fit in the file"
        )));
    }

    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string()?.unwrap_or_default();
        let value_type = r.u32()?;
        let value = r.value(value_type)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(r.invalid(format!("general.alignment {v:?} is not a power of two"))),
        },
    };

    let mut tensor_ends = Vec::new();
    let mut tensors = Vec::new();
    let mut parameter_count: u64 = 0;
    for _ in 0..tensor_count {
        let name = r.string()?.unwrap_or_default();
        let n_dims = r.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.invalid(format!("tensor {name} has {n_dims} dimensions")));
        }
        let mut elements: u64 = 1;
        let mut first_dim = 0;
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim = r.u64()?;
            dims.push(dim);
            if d == 0 {
                first_dim = dim;
            }
            elements = elements
                .checked_mul(dim)
                .ok_or_else(|| r.invalid(format!("tensor {name} has too many elements")))?;
        }
        let ggml_type = r.u32()?;
        let offset = r.u64()?;
        if !offset.is_multiple_of(alignment) {
            return Err(r.invalid(format!(
                "tensor {name} data offset {offset} is not aligned to {alignment}"
            )));
        }
        let size = match tensor_bytes(ggml_type, elements, first_dim) {
            Some(Ok(size)) => size,
            Some(Err(())) => {
                return Err(r.invalid(format!(
                    "tensor {name} row of {first_dim} elements does not fill whole blocks of type {ggml_type}"
                )));
            }
            // A type this reader does not know: the offset still bounds the data from below.
            None => 0,
        };
        let end = offset
            .checked_add(size)
            .ok_or_else(|| r.invalid(format!("tensor {name} data end overflows")))?;
        tensor_ends.push(end);
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset_bytes: offset,
            size_bytes: size,
        });
        parameter_count = parameter_count.saturating_add(elements);
    }

    let header_end = r.pos;
    let data_offset_bytes = header_end.div_ceil(alignment) * alignment;
    let data_end = tensor_ends.iter().copied().max().unwrap_or(0);
    let needed_bytes = data_offset_bytes
        .checked_add(data_end)
        .ok_or_else(|| r.invalid("tensor data end overflows".to_owned()))?;
    if tensor_count > 0 && needed_bytes > file_bytes {
        return Err(Error::TruncatedGguf {
            path: r.path,
            section: "tensor data",
            needed_bytes,
            file_bytes,
        });
    }

    for t in &mut tensors {
        // Offsets in the descriptors count from the data section.
        t.offset_bytes = t.offset_bytes.saturating_add(data_offset_bytes);
    }
    Ok(GgufSummary {
        version,
        tensor_count,
        parameter_count,
        metadata,
        data_offset_bytes,
        needed_bytes,
        file_bytes,
        tensors,
    })
}

/// Bytes taken by a tensor of `elements` elements of ggml type `ggml_type`
/// whose rows have `row` elements.
///
/// `None` for a type this table does not know; `Some(Err(()))` when the rows
/// are not a whole number of quantisation blocks.
fn tensor_bytes(ggml_type: u32, elements: u64, row: u64) -> Option<Result<u64, ()>> {
    // (elements per block, bytes per block), from the ggml type table.
    let (block, bytes): (u64, u64) = match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    };
    if !row.is_multiple_of(block) {
        return Some(Err(()));
    }
    Some(Ok((elements / block).saturating_mul(bytes)))
}

/// A reader that knows how many bytes are left and never allocates more.
struct Reader<R> {
    inner: R,
    pos: u64,
    file_bytes: u64,
    path: PathBuf,
}

impl<R: Read> Reader<R> {
    fn invalid(&self, reason: String) -> Error {
        Error::InvalidGguf {
            path: self.path.clone(),
            reason,
        }
    }

    fn truncated(&self, needed: u64) -> Error {
        Error::TruncatedGguf {
            path: self.path.clone(),
            section: "header",
            needed_bytes: self.pos.saturating_add(needed),
            file_bytes: self.file_bytes,
        }
    }

    fn remaining(&self) -> u64 {
        self.file_bytes.saturating_sub(self.pos)
    }

    fn exact<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        if self.remaining() < N as u64 {
            return Err(self.truncated(N as u64));
        }
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.truncated(N as u64)
            } else {
                Error::Io {
                    path: self.path.clone(),
                    source: e,
                }
            }
        })?;
        self.pos += N as u64;
        Ok(buf)
    }

    /// Up to `n` bytes: fewer if the file is shorter (used for the magic).
    fn bytes_prefix(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(n);
        (&mut self.inner)
            .take(n as u64)
            .read_to_end(&mut buf)
            .map_err(Error::io(&self.path))?;
        self.pos += buf.len() as u64;
        if !buf.is_empty() && buf.len() < n && buf == MAGIC[..buf.len()] {
            return Err(self.truncated((n - buf.len()) as u64));
        }
        Ok(buf)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.exact::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.exact()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.exact()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.exact()?))
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        if self.remaining() < n {
            return Err(self.truncated(n));
        }
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(Error::io(&self.path))?;
        if copied < n {
            return Err(self.truncated(n - copied));
        }
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string; `None` when it is too long to keep.
    fn string(&mut self) -> Result<Option<String>> {
        let len = self.u64()?;
        if len > self.remaining() {
            return Err(self.truncated(len));
        }
        if len > MAX_KEPT_STRING_BYTES {
            self.skip(len)?;
            return Ok(None);
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.truncated(len)
            } else {
                Error::Io {
                    path: self.path.clone(),
                    source: e,
                }
            }
        })?;
        self.pos += len;
        Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
    }

    fn value(&mut self, value_type: u32) -> Result<MetaValue> {
        Ok(match value_type {
            0 => MetaValue::Uint(u64::from(self.u8()?)),
            1 => MetaValue::Int(i64::from(self.u8()? as i8)),
            2 => MetaValue::Uint(u64::from(self.u16()?)),
            3 => MetaValue::Int(i64::from(self.u16()? as i16)),
            4 => MetaValue::Uint(u64::from(self.u32()?)),
            5 => MetaValue::Int(i64::from(self.u32()? as i32)),
            6 => MetaValue::Float(f64::from(f32::from_bits(self.u32()?))),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                let element_type = self.u32()?;
                let len = self.u64()?;
                match element_size(element_type) {
                    Some(size) => self.skip(len.checked_mul(size).ok_or_else(|| {
                        self.invalid(format!("array of {len} elements overflows"))
                    })?)?,
                    None if element_type == 8 => {
                        // Each string takes at least its 8-byte length.
                        if len > self.remaining() / 8 {
                            return Err(self.truncated(len.saturating_mul(8)));
                        }
                        for _ in 0..len {
                            let n = self.u64()?;
                            self.skip(n)?;
                        }
                    }
                    None => {
                        return Err(self.invalid(format!(
                            "array element type {element_type} is not supported"
                        )));
                    }
                }
                MetaValue::Array { element_type, len }
            }
            10 => MetaValue::Uint(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_bits(self.u64()?)),
            other => return Err(self.invalid(format!("metadata value type {other} is unknown"))),
        })
    }
}

/// Size of one fixed-size GGUF value type, `None` for strings and arrays.
fn element_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal GGUF file: the given string metadata and one F32
    /// tensor of `elements` elements, with its data.
    pub(crate) fn tiny_gguf(meta: &[(&str, &str)], elements: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for (k, v) in meta {
            put_str(&mut out, k);
            out.extend_from_slice(&8u32.to_le_bytes());
            put_str(&mut out, v);
        }
        put_str(&mut out, "weight");
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&elements.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        while out.len() % 32 != 0 {
            out.push(0);
        }
        out.extend(std::iter::repeat_n(0u8, elements as usize * 4));
        out
    }

    fn parse_bytes(bytes: &[u8]) -> Result<GgufSummary> {
        parse(bytes, bytes.len() as u64, Path::new("model.gguf"))
    }

    #[test]
    fn reads_a_valid_file() {
        let bytes = tiny_gguf(
            &[("general.architecture", "llama"), ("general.name", "tiny")],
            8,
        );
        let summary = parse_bytes(&bytes).expect("valid file");
        assert_eq!(summary.version, 3);
        assert_eq!(summary.tensor_count, 1);
        assert_eq!(summary.parameter_count, 8);
        assert_eq!(summary.architecture(), Some("llama"));
        assert_eq!(summary.name(), Some("tiny"));
        assert_eq!(summary.needed_bytes, bytes.len() as u64);
    }

    #[test]
    fn rejects_wrong_magic() {
        let err = parse_bytes(b"PK\x03\x04 this is a zip file").unwrap_err();
        assert!(matches!(err, Error::NotGguf { .. }), "{err}");
        assert!(err.to_string().contains("not a gguf file"), "{err}");
        let err = parse_bytes(b"").unwrap_err();
        assert!(matches!(err, Error::NotGguf { .. }), "{err}");
    }

    #[test]
    fn rejects_truncation_anywhere() {
        let bytes = tiny_gguf(&[("general.architecture", "llama")], 16);
        // Cutting the file at any point must give a clean error, never a
        // success and never a panic.
        for cut in 1..bytes.len() {
            let err = parse_bytes(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, Error::TruncatedGguf { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn rejects_absurd_counts_without_allocating() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let err = parse_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("tensor count"), "{err}");
    }

    #[test]
    fn rejects_unknown_version() {
        let mut bytes = tiny_gguf(&[], 1);
        bytes[4] = 7;
        let err = parse_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("version 7"), "{err}");
    }
}
