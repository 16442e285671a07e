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

/// One tensor to write.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// The tensor's name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: the first is the length of a row (the
    /// fastest-varying index), the reverse of a row-major shape.
    pub dims: Vec<u64>,
    /// The element type of `data`.
    pub dtype: TensorType,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor of `values` with the row-major `shape` (as safetensors and
    /// PyTorch give it), stored as `dtype`.
    pub fn from_f32(name: &str, shape: &[usize], values: &[f32], dtype: TensorType) -> Tensor {
        let data = match dtype {
            TensorType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            TensorType::F16 => values
                .iter()
                .flat_map(|&v| f32_to_f16_bits(v).to_le_bytes())
                .collect(),
        };
        Tensor {
            name: name.to_owned(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            dtype,
            data,
        }
    }
}

/// A GGUF file being assembled in memory.
#[derive(Debug, Default)]
pub struct Builder {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
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

    /// Adds a tensor.
    pub fn tensor(&mut self, tensor: Tensor) -> &mut Builder {
        self.tensors.push(tensor);
        self
    }

    /// Writes the file: header, metadata, tensor descriptors, aligned data.
    ///
    /// Fails with `InvalidInput` when a tensor's data does not match its
    /// dimensions.
    pub fn write_to<W: Write>(&self, mut w: W) -> io::Result<()> {
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut offset = 0usize;
        for t in &self.tensors {
            let elements: u64 = t.dims.iter().product();
            if t.dims.is_empty()
                || t.dims.len() > 4
                || elements as usize * t.dtype.element_bytes() != t.data.len()
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "tensor {} has {} bytes of data for dimensions {:?}",
                        t.name,
                        t.data.len(),
                        t.dims
                    ),
                ));
            }
            offsets.push(offset as u64);
            offset = (offset + t.data.len()).next_multiple_of(ALIGNMENT);
        }

        let mut header = Vec::new();
        header.extend_from_slice(&super::MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut header, key);
            put_value(&mut header, value);
        }
        for (t, offset) in self.tensors.iter().zip(&offsets) {
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
        }
        header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
        w.write_all(&header)?;

        let padding = [0u8; ALIGNMENT];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let pad = t.data.len().next_multiple_of(ALIGNMENT) - t.data.len();
            w.write_all(&padding[..pad])?;
        }
        w.flush()
    }
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
        b.meta("general.architecture", Value::String("bert".into()))
            .meta("bert.block_count", Value::U32(6))
            .meta("bert.attention.layer_norm_epsilon", Value::F32(1e-12))
            .meta("bert.attention.causal", Value::Bool(false))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Strings(vec!["a".into(), "b".into()]),
            )
            .meta("tokenizer.ggml.token_type", Value::I32s(vec![1, 3]))
            .tensor(Tensor::from_f32("w", &[2, 3], &[1.0; 6], TensorType::F16))
            .tensor(Tensor::from_f32("b", &[3], &[0.5; 3], TensorType::F32));
        let mut bytes = Vec::new();
        b.write_to(&mut bytes).expect("writes");
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
        let mut b = Builder::new();
        b.tensor(Tensor {
            name: "w".into(),
            dims: vec![4],
            dtype: TensorType::F32,
            data: vec![0; 8],
        });
        let err = b.write_to(Vec::new()).unwrap_err();
        assert!(err.to_string().contains("tensor w"), "{err}");
    }
}
