//! A GGUF (version 3) writer: metadata and `F32`/`F16` tensors.
//!
//! The runtime writes GGUF files for models that arrive in another format
//! (a BERT encoder as `model.safetensors`, see [`crate::embedding`]) so that
//! llama.cpp can run them. Only what those conversions need is here: scalar,
//! string and array metadata, and unquantised tensors.

use std::io::{self, Write};

/// GGUF metadata value type ids.
mod value_type {
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
}

/// The alignment of tensor data (the GGUF default).
const ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u32`.
    U32(u32),
    /// `f32`.
    F32(f32),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of strings.
    Strings(Vec<String>),
    /// An array of `i32`.
    I32s(Vec<i32>),
}

/// The element type of a tensor, with its ggml type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// 32-bit floats (ggml type 0).
    F32,
    /// IEEE half-precision floats (ggml type 1).
    F16,
}

impl TensorType {
    fn ggml_id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
        }
    }

    fn element_bytes(self) -> usize {
        match self {
            TensorType::F32 => 4,
            TensorType::F16 => 2,
        }
    }
}

/// What the header says of a tensor: its name, shape and element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: the first is the length of a row (the
    /// fastest-varying index), the reverse of a row-major shape.
    pub dims: Vec<u64>,
    /// The element type.
    pub dtype: TensorType,
}

impl TensorInfo {
    /// A tensor with the row-major `shape` (as safetensors and PyTorch
    /// give it), stored as `dtype`.
    pub fn row_major(name: &str, shape: &[usize], dtype: TensorType) -> TensorInfo {
        TensorInfo {
            name: name.to_owned(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            dtype,
        }
    }

    /// Bytes of its data.
    pub fn data_bytes(&self) -> usize {
        self.dims.iter().product::<u64>() as usize * self.dtype.element_bytes()
    }

    /// Encodes `values` (row-major, as many as the shape holds) as this
    /// tensor's element type.
    pub fn encode(&self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(values, &mut out);
        out
    }

    /// Like [`TensorInfo::encode`], into a buffer that is cleared first (so
    /// a conversion reuses one buffer for every tensor).
    pub fn encode_into(&self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self.dtype {
            TensorType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            TensorType::F16 => {
                out.extend(
                    values
                        .iter()
                        .flat_map(|&v| f32_to_f16_bits(v).to_le_bytes()),
                );
            }
        }
    }
}

/// A GGUF file's header being assembled: metadata and tensor descriptions.
/// The tensor data follows the header, one tensor at a time
/// ([`write_tensor`]), so a conversion never holds a whole model twice.
#[derive(Debug, Default)]
pub struct Builder {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

impl Builder {
    /// An empty file.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Adds a metadata pair.
    pub fn meta(&mut self, key: &str, value: Value) -> &mut Builder {
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Describes the next tensor; its data must be written in this order.
    pub fn tensor(&mut self, tensor: TensorInfo) -> &mut Builder {
        self.tensors.push(tensor);
        self
    }

    /// The tensors described so far, in order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Writes the header: magic, metadata, tensor descriptors with their
    /// aligned offsets, padding up to the data section.
    pub fn write_header<W: Write>(&self, mut w: W) -> io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(&super::MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut header, key);
            put_value(&mut header, value);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            if t.dims.is_empty() || t.dims.len() > 4 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("tensor {} has {} dimensions", t.name, t.dims.len()),
                ));
            }
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + t.data_bytes()).next_multiple_of(ALIGNMENT);
        }
        header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
        w.write_all(&header)
    }
}

/// Writes one tensor's data (and the padding after it), in header order.
/// Fails with `InvalidInput` when `data` does not match the description.
pub fn write_tensor<W: Write>(mut w: W, info: &TensorInfo, data: &[u8]) -> io::Result<()> {
    if data.len() != info.data_bytes() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "tensor {} has {} bytes of data for dimensions {:?}",
                info.name,
                data.len(),
                info.dims
            ),
        ));
    }
    w.write_all(data)?;
    let pad = data.len().next_multiple_of(ALIGNMENT) - data.len();
    w.write_all(&[0u8; ALIGNMENT][..pad])
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U32(v) => {
            out.extend_from_slice(&value_type::U32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::F32(v) => {
            out.extend_from_slice(&value_type::F32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::Bool(v) => {
            out.extend_from_slice(&value_type::BOOL.to_le_bytes());
            out.push(u8::from(*v));
        }
        Value::String(s) => {
            out.extend_from_slice(&value_type::STRING.to_le_bytes());
            put_string(out, s);
        }
        Value::Strings(items) => {
            out.extend_from_slice(&value_type::ARRAY.to_le_bytes());
            out.extend_from_slice(&value_type::STRING.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                put_string(out, s);
            }
        }
        Value::I32s(items) => {
            out.extend_from_slice(&value_type::ARRAY.to_le_bytes());
            out.extend_from_slice(&value_type::I32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Rounds an `f32` to the nearest IEEE half (ties to even), saturating to
/// infinity; NaN stays NaN.
pub fn f32_to_f16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x007f_ffff;
    if exp == 0xff {
        // Infinity or NaN (keep a mantissa bit so NaN stays NaN).
        return sign | 0x7c00 | if mant != 0 { 0x0200 } else { 0 };
    }
    let half_exp = exp - 127 + 15;
    if half_exp >= 0x1f {
        return sign | 0x7c00;
    }
    if half_exp <= 0 {
        // Subnormal half (or zero): shift the mantissa with its implicit bit.
        if half_exp < -10 {
            return sign;
        }
        let m = mant | 0x0080_0000;
        let shift = (14 - half_exp) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let round = rem > halfway || (rem == halfway && (half & 1) == 1);
        return sign | (half + u32::from(round)) as u16;
    }
    let half = ((half_exp as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    let round = rem > 0x1000 || (rem == 0x1000 && (half & 1) == 1);
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    sign | (half + u32::from(round)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf;
    use std::path::Path;

    #[test]
    fn f16_conversion_cases() {
        let cases: &[(f32, u16)] = &[
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00), // rounds up to infinity
            (1e9, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (5.960_464_5e-8, 0x0001), // smallest subnormal
            (1e-9, 0x0000),
            (0.333_333_34, 0x3555),
            (1.000_976_6, 0x3c01),
            (1.000_488_3, 0x3c00), // exactly halfway: ties to even
        ];
        for &(v, want) in cases {
            assert_eq!(f32_to_f16_bits(v), want, "{v}");
        }
        assert_eq!(f32_to_f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f32_to_f16_bits(f32::NAN) & 0x03ff, 0);
    }

    #[test]
    fn written_file_reads_back() {
        let mut b = Builder::new();
        let w = TensorInfo::row_major("w", &[2, 3], TensorType::F16);
        let bias = TensorInfo::row_major("b", &[3], TensorType::F32);
        b.meta("general.architecture", Value::String("bert".into()))
            .meta("bert.block_count", Value::U32(6))
            .meta("bert.attention.layer_norm_epsilon", Value::F32(1e-12))
            .meta("bert.attention.causal", Value::Bool(false))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Strings(vec!["a".into(), "b".into()]),
            )
            .meta("tokenizer.ggml.token_type", Value::I32s(vec![1, 3]))
            .tensor(w.clone())
            .tensor(bias.clone());
        let mut bytes = Vec::new();
        b.write_header(&mut bytes).expect("writes the header");
        write_tensor(&mut bytes, &w, &w.encode(&[1.0; 6])).expect("writes w");
        write_tensor(&mut bytes, &bias, &bias.encode(&[0.5; 3])).expect("writes b");
        let summary =
            gguf::parse(bytes.as_slice(), bytes.len() as u64, Path::new("t.gguf")).expect("parses");
        assert_eq!(summary.version, 3);
        assert_eq!(summary.tensor_count, 2);
        assert_eq!(summary.parameter_count, 9);
        assert_eq!(summary.architecture(), Some("bert"));
        assert_eq!(summary.metadata["bert.block_count"].as_u64(), Some(6));
        assert_eq!(
            summary.needed_bytes,
            bytes.len() as u64 - 20,
            "last tensor padded"
        );
    }

    #[test]
    fn mismatched_tensor_data_is_refused() {
        let info = TensorInfo {
            name: "w".into(),
            dims: vec![4],
            dtype: TensorType::F32,
        };
        let err = write_tensor(Vec::new(), &info, &[0; 8]).unwrap_err();
        assert!(err.to_string().contains("tensor w"), "{err}");
    }
}
