//! A small reader for GGUF, the single-file model format of llama.cpp.
//!
//! A GGUF file is three things in a row:
//!
//! ```text
//! "GGUF" | version | tensor count | metadata count
//! metadata: key → typed value   (architecture, hyper-parameters, the tokenizer's vocab and merges)
//! tensor infos: name, dims, type, offset
//! padding to `general.alignment` (32 by default), then the tensor data
//! ```
//!
//! Weights are usually quantised in blocks of 32 values that share a scale,
//! which is why a 135M-parameter model is 98 MB instead of 540 MB. We read
//! the types that llama.cpp writes for small Llama models (F32, F16, BF16,
//! Q4_0, Q4_1, Q8_0) and dequantise them to `f32` at load time: the engine
//! then runs in f32 or bf16 like any Hugging Face checkpoint.
//!
//! Existing GGUF crates either come inside a whole ML framework or do not
//! dequantise; the format is small enough that a reader a student can check
//! against the spec is the better teaching tool. Every read is bounds-checked,
//! so a truncated or corrupt file is an error that names the file and the
//! offset, never a panic or an unbounded allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use super::LoadError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Larger arrays or strings than this cannot be legitimate metadata; refusing
/// them keeps a corrupt length field from allocating gigabytes.
const MAX_ELEMENTS: u64 = 16 * 1024 * 1024;

/// One metadata value. GGUF's type tags map one-to-one onto these variants.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer type as `u64` (GGUF writers differ in which width they pick).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) if v >= 0 => Some(v as u64),
            GgufValue::I16(v) if v >= 0 => Some(v as u64),
            GgufValue::I32(v) if v >= 0 => Some(v as u64),
            GgufValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(values) => Some(values),
            _ => None,
        }
    }
}

/// Storage type of a tensor (`ggml_type` in llama.cpp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (values per block, bytes per block).
    fn block_layout(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 2 + 16),
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            GgmlType::Q8_0 => (32, 2 + 32),
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` varies fastest. A `[out, in]` matrix in PyTorch
    /// terms is stored as `dims = [in, out]`.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape PyTorch uses for the same data (row-major, dims reversed).
    pub fn torch_shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    fn byte_len(&self) -> Option<u64> {
        let (per_block, block_bytes) = self.ggml_type.block_layout();
        let n = self.num_elements();
        (n % per_block == 0).then(|| n / per_block * block_bytes)
    }
}

/// A memory-mapped GGUF file with its metadata and tensor directory parsed.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    data_start: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; a file
        // changed underneath us while loading could only produce garbage
        // weights, which the shape and bounds checks below turn into errors.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        Self::parse(path.to_path_buf(), mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self, LoadError> {
        let mut r = Reader {
            bytes: &mmap,
            pos: 0,
            path: &path,
        };
        if r.take(4, "magic")? != MAGIC {
            return Err(r.error("not a GGUF file (the first four bytes are not \"GGUF\")"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.error(&format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let tensor_count = r.count("tensor count")?;
        let metadata_count = r.count("metadata count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = r.string("metadata key")?;
            let type_id = r.u32("metadata type")?;
            let value = r.value(type_id, &key)?;
            metadata.insert(key, value);
        }

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor rank")?;
            if n_dims > 4 {
                return Err(r.error(&format!("tensor {name} has rank {n_dims}; GGUF allows 4")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64("tensor dim"))
                .collect::<Result<Vec<_>, _>>()?;
            let type_id = r.u32("tensor type")?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                r.error(&format!(
                    "tensor {name} has ggml type {type_id}, which this reader does not \
                     dequantise (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0); \
                     convert the model with llama.cpp's quantize to one of those"
                ))
            })?;
            let offset = r.u64("tensor offset")?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT)
            .max(1);
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;

        let file = GgufFile {
            path,
            mmap,
            version,
            metadata,
            tensors,
            data_start,
        };
        for info in &file.tensors {
            file.tensor_bytes(info)?;
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (still quantised) bytes of a tensor, checked to lie inside the file.
    fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8], LoadError> {
        let format = |message: String| LoadError::Format {
            path: self.path.clone(),
            message,
        };
        let len = info.byte_len().ok_or_else(|| {
            format(format!(
                "tensor {} has {} elements, not a whole number of {:?} blocks",
                info.name,
                info.num_elements(),
                info.ggml_type
            ))
        })?;
        let start = self.data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.mmap.len() as u64 => {
                Ok(&self.mmap[start as usize..end as usize])
            }
            _ => Err(format(format!(
                "tensor {} needs bytes up to {} but the file is {} bytes long (truncated download?)",
                info.name,
                end.map_or("overflow".to_string(), |e| e.to_string()),
                self.mmap.len()
            ))),
        }
    }

    /// Reads a tensor and dequantises it to `f32`, in GGUF element order.
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>, LoadError> {
        let bytes = self.tensor_bytes(info)?;
        Ok(dequantize(
            info.ggml_type,
            bytes,
            info.num_elements() as usize,
        ))
    }
}

/// Turns blocks of a quantised type back into `f32` values.
///
/// * `Q8_0`: `value = d * q` with one f16 scale `d` and 32 signed bytes.
/// * `Q4_0`: `value = d * (q - 8)`, 4-bit `q`; low nibbles hold elements
///   0..16 of the block, high nibbles 16..32.
/// * `Q4_1`: `value = d * q + m`, a scale and a minimum per block.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ggml_type {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        // ANCHOR: dequantize
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(34) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_0 => {
            for block in bytes.chunks_exact(18) {
                let d = f16_at(block, 0);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as f32 - 8.0)));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as f32 - 8.0)));
            }
        }
        GgmlType::Q4_1 => {
            for block in bytes.chunks_exact(20) {
                let d = f16_at(block, 0);
                let m = f16_at(block, 2);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        } // ANCHOR_END: dequantize
    }
    debug_assert_eq!(out.len(), n);
    out
}

/// A bounds-checked cursor over the header.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, message: &str) -> LoadError {
        LoadError::Format {
            path: self.path.to_path_buf(),
            message: message.to_string(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], LoadError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.error(&format!(
                "file ends at byte {} while reading the {what} at byte {} (truncated download?)",
                self.bytes.len(),
                self.pos
            ))
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LoadError> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length or count field, refused when it cannot be real.
    fn count(&mut self, what: &str) -> Result<u64, LoadError> {
        let n = self.u64(what)?;
        if n > MAX_ELEMENTS {
            return Err(self.error(&format!("{what} {n} is implausibly large (corrupt file?)")));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let len = self.count(what)? as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error(&format!("{what} at byte {} is not UTF-8", self.pos - len)))
    }

    fn value(&mut self, type_id: u32, key: &str) -> Result<GgufValue, LoadError> {
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => GgufValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                let element_type = self.u32(key)?;
                let len = self.count(key)?;
                let values = (0..len)
                    .map(|_| self.value(element_type, key))
                    .collect::<Result<_, _>>()?;
                GgufValue::Array(values)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.error(&format!("metadata {key} has unknown value type {other}")))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_scales_signed_bytes() {
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let values = dequantize(GgmlType::Q8_0, &block, 32);
        assert_eq!(values[0], -8.0);
        assert_eq!(values[16], 0.0);
        assert_eq!(values[31], 7.5);
    }

    #[test]
    fn q4_1_low_nibbles_first_then_high() {
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        // Byte j holds element j (low nibble) and element j + 16 (high nibble).
        block.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let values = dequantize(GgmlType::Q4_1, &block, 32);
        for j in 0..16 {
            assert_eq!(values[j], 2.0 * j as f32 - 1.0);
            assert_eq!(values[j + 16], 2.0 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q4_0_is_centred_on_eight() {
        let mut block = f16::from_f32(1.0).to_le_bytes().to_vec();
        block.extend([0x80u8; 16]);
        let values = dequantize(GgmlType::Q4_0, &block, 32);
        assert!(values[..16].iter().all(|&v| v == -8.0));
        assert!(values[16..].iter().all(|&v| v == 0.0));
    }
}
