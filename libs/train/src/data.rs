//! Local dataset files: CSV, NPY and IDX (MNIST) readers, and a CSV writer.

use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use crate::TrainError;

/// Features (n × d, row-major, f32, already scaled) and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub features: Vec<f32>,
    pub labels: Vec<u32>,
    pub n: usize,
    pub d: usize,
}

impl Dataset {
    /// The samples at `idx`, in that order.
    ///
    /// # Panics
    /// If an index is not below `n` (indices come from the partitioners, not from files).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(idx.len() * self.d);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            features.extend_from_slice(&self.features[i * self.d..(i + 1) * self.d]);
            labels.push(self.labels[i]);
        }
        Dataset {
            features,
            labels,
            n: idx.len(),
            d: self.d,
        }
    }

    pub fn max_label(&self) -> Option<u32> {
        self.labels.iter().copied().max()
    }

    /// Number of classes the labels imply (`max_label + 1`, 0 when empty).
    pub fn classes(&self) -> usize {
        self.max_label().map_or(0, |m| m as usize + 1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    Csv,
    Npy,
    Idx,
}

impl DataFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Csv => "csv",
            DataFormat::Npy => "npy",
            DataFormat::Idx => "idx",
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DataFormat {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "csv" => Ok(DataFormat::Csv),
            "npy" => Ok(DataFormat::Npy),
            "idx" => Ok(DataFormat::Idx),
            other => Err(TrainError::UnknownFormat(other.to_string())),
        }
    }
}

/// Loads a dataset file.
///
/// - CSV: comma separated, optional header row (the first row is a header when not all of
///   its fields are numbers), label in the last column, features in the others.
/// - NPY: `path` is an array of u8/i8/u16/i16/u32/i32/u64/i64/f32/f64 (little endian, C order,
///   format version 1.0–3.0) with at least 2 dimensions, flattened per sample; `labels` is a
///   1-D integer npy file (required).
/// - IDX (MNIST format): `path` holds the samples (idx3 images, or any idxN with N ≥ 2),
///   `labels` an idx1 file (required).
///
/// Every feature is multiplied by `scale`; `None` means 1.0 for csv/npy and 1/255 for idx.
pub fn load_dataset(
    path: &Path,
    format: DataFormat,
    labels: Option<&Path>,
    scale: Option<f32>,
) -> Result<Dataset, TrainError> {
    let scale = scale.unwrap_or(match format {
        DataFormat::Idx => 1.0 / 255.0,
        DataFormat::Csv | DataFormat::Npy => 1.0,
    });
    if !scale.is_finite() {
        return Err(TrainError::invalid(
            "scale",
            format!("must be a finite number, got {scale}"),
        ));
    }
    let need_labels = || {
        labels.ok_or_else(|| {
            TrainError::invalid(
                "labels",
                format!("{format} dataset {} needs a labels file", path.display()),
            )
        })
    };
    let mut ds = match format {
        DataFormat::Csv => load_csv(path)?,
        DataFormat::Npy => {
            let labels_path = need_labels()?;
            let (n, d, features) = read_features(path, read_npy(path)?)?;
            let labels = read_labels(labels_path, read_npy(labels_path)?)?;
            join(path, labels_path, n, d, features, labels)?
        }
        DataFormat::Idx => {
            let labels_path = need_labels()?;
            let (n, d, features) = read_features(path, read_idx(path)?)?;
            let labels = read_labels(labels_path, read_idx(labels_path)?)?;
            join(path, labels_path, n, d, features, labels)?
        }
    };
    if scale != 1.0 {
        ds.features.iter_mut().for_each(|v| *v *= scale);
    }
    Ok(ds)
}

/// Writes a dataset as CSV: header row "f0,...,f{d-1},label", label last.
pub fn write_csv(ds: &Dataset, path: &Path) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    if ds.features.len() != ds.n * ds.d || ds.labels.len() != ds.n {
        return Err(TrainError::invalid(
            "dataset",
            format!(
                "inconsistent: n={} d={} but {} feature values and {} labels",
                ds.n,
                ds.d,
                ds.features.len(),
                ds.labels.len()
            ),
        ));
    }
    let mut w = BufWriter::new(fs::File::create(path).map_err(io)?);
    let mut line = String::new();
    for j in 0..ds.d {
        line.push_str(&format!("f{j},"));
    }
    line.push_str("label\n");
    w.write_all(line.as_bytes()).map_err(io)?;
    for (i, label) in ds.labels.iter().enumerate() {
        line.clear();
        for v in &ds.features[i * ds.d..(i + 1) * ds.d] {
            // `{}` on f32 is the shortest text that reads back to the same value.
            line.push_str(&format!("{v},"));
        }
        line.push_str(&format!("{label}\n"));
        w.write_all(line.as_bytes()).map_err(io)?;
    }
    w.flush().map_err(io)
}

fn load_csv(path: &Path) -> Result<Dataset, TrainError> {
    let text = fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let err = |line: usize, message: String| TrainError::Csv {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut columns: Option<usize> = None;
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let cols = match columns {
            Some(c) => c,
            None => {
                if fields.len() < 2 {
                    return Err(err(
                        line_no,
                        format!(
                            "expected at least 2 columns (features, then the label), found {}",
                            fields.len()
                        ),
                    ));
                }
                columns = Some(fields.len());
                if !fields.iter().all(|f| f.parse::<f64>().is_ok()) {
                    continue; // header row
                }
                fields.len()
            }
        };
        if fields.len() != cols {
            return Err(err(
                line_no,
                format!("expected {cols} columns, found {}", fields.len()),
            ));
        }
        let (label, feats) = match fields.split_last() {
            Some(split) => split,
            None => continue,
        };
        for (j, f) in feats.iter().enumerate() {
            match f.parse::<f32>() {
                Ok(v) if v.is_finite() => features.push(v),
                _ => {
                    return Err(err(
                        line_no,
                        format!("column {}: {f:?} is not a finite number", j + 1),
                    ));
                }
            }
        }
        let label = parse_label(label).ok_or_else(|| {
            err(
                line_no,
                format!("label (column {cols}): {label:?} is not a non-negative integer"),
            )
        })?;
        labels.push(label);
    }
    let Some(cols) = columns else {
        return Err(TrainError::format(path, "empty file: no rows"));
    };
    if labels.is_empty() {
        return Err(TrainError::format(path, "no data rows after the header"));
    }
    Ok(Dataset {
        n: labels.len(),
        d: cols - 1,
        features,
        labels,
    })
}

/// Accepts "3" and also "3.0" (pandas writes integer columns with NaNs as floats).
fn parse_label(s: &str) -> Option<u32> {
    if let Ok(v) = s.parse::<u32>() {
        return Some(v);
    }
    let v = s.parse::<f64>().ok()?;
    float_label(v)
}

fn float_label(v: f64) -> Option<u32> {
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX)).then_some(v as u32)
}

/// Element type of an array file.
#[derive(Clone, Copy, Debug)]
enum Elem {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::U8 | Elem::I8 => 1,
            Elem::U16 | Elem::I16 => 2,
            Elem::U32 | Elem::I32 | Elem::F32 => 4,
            Elem::U64 | Elem::I64 | Elem::F64 => 8,
        }
    }

    fn is_integer(self) -> bool {
        !matches!(self, Elem::F32 | Elem::F64)
    }
}

/// A whole array read from a file: shape, element type and the raw element bytes.
struct RawArray {
    shape: Vec<usize>,
    elem: Elem,
    big_endian: bool,
    bytes: Vec<u8>,
    /// Where the element bytes start in `bytes`.
    offset: usize,
}

impl RawArray {
    /// Calls `f` with every element, in order, as f64.
    fn for_each(&self, mut f: impl FnMut(f64)) {
        macro_rules! each {
            ($t:ty, $n:expr) => {
                for c in self.bytes[self.offset..].chunks_exact($n) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    let v = if self.big_endian {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    };
                    f(v as f64);
                }
            };
        }
        match self.elem {
            Elem::U8 => each!(u8, 1),
            Elem::I8 => each!(i8, 1),
            Elem::U16 => each!(u16, 2),
            Elem::I16 => each!(i16, 2),
            Elem::U32 => each!(u32, 4),
            Elem::I32 => each!(i32, 4),
            Elem::U64 => each!(u64, 8),
            Elem::I64 => each!(i64, 8),
            Elem::F32 => each!(f32, 4),
            Elem::F64 => each!(f64, 8),
        }
    }
}

/// Element count of `shape` and byte size, or an error if it overflows or the file has a
/// different number of data bytes.
fn check_size(
    path: &Path,
    shape: &[usize],
    elem: Elem,
    available: usize,
) -> Result<(), TrainError> {
    let bytes = shape
        .iter()
        .try_fold(elem.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| TrainError::format(path, format!("shape {shape:?} is too large")))?;
    if bytes != available {
        return Err(TrainError::format(
            path,
            format!("shape {shape:?} of {elem:?} needs {bytes} bytes of data, found {available}"),
        ));
    }
    Ok(())
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, TrainError> {
    fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_npy(path: &Path) -> Result<RawArray, TrainError> {
    let bytes = read_bytes(path)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(TrainError::format(
            path,
            "not an npy file (missing the \\x93NUMPY magic)",
        ));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => {
            return Err(TrainError::format(
                path,
                format!("unsupported npy format version {v}.{}", bytes[7]),
            ));
        }
    };
    let offset = header_start + header_len;
    let header = bytes
        .get(header_start..offset)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| TrainError::format(path, "truncated or non-text npy header"))?;
    let bad = |what: &str| TrainError::format(path, format!("npy header: {what} in {header:?}"));

    let descr = dict_value(header, "descr")
        .and_then(quoted)
        .ok_or_else(|| bad("no 'descr' string (structured dtypes are not supported)"))?;
    let (big_endian, elem) = parse_descr(descr).ok_or_else(|| {
        TrainError::format(
            path,
            format!(
                "unsupported npy dtype {descr:?}: use a little-endian integer or float \
                 type (u1, i4, i8, f4, f8, ...)"
            ),
        )
    })?;
    let fortran = dict_value(header, "fortran_order").ok_or_else(|| bad("no 'fortran_order'"))?;
    if fortran.starts_with("True") {
        return Err(TrainError::format(
            path,
            "Fortran-order arrays are not supported: save with np.ascontiguousarray",
        ));
    }
    let shape_text = dict_value(header, "shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split_once(')'))
        .map(|(inner, _)| inner)
        .ok_or_else(|| bad("no 'shape' tuple"))?;
    let mut shape = Vec::new();
    for part in shape_text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let dim = part
            .trim_end_matches('L')
            .parse::<usize>()
            .map_err(|_| bad(&format!("shape entry {part:?} is not a size")))?;
        shape.push(dim);
    }
    check_size(path, &shape, elem, bytes.len().saturating_sub(offset))?;
    Ok(RawArray {
        shape,
        elem,
        big_endian,
        bytes,
        offset,
    })
}

/// The text after `'key':` in a Python dict literal.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let single = format!("'{key}':");
    let double = format!("\"{key}\":");
    let (at, len) = header
        .find(&single)
        .map(|at| (at, single.len()))
        .or_else(|| header.find(&double).map(|at| (at, double.len())))?;
    Some(header[at + len..].trim_start())
}

/// The content of a leading '...' or "..." string.
fn quoted(s: &str) -> Option<&str> {
    let q = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &s[1..];
    rest.find(q).map(|end| &rest[..end])
}

fn parse_descr(descr: &str) -> Option<(bool, Elem)> {
    let (order, ty) = descr.split_at_checked(1)?;
    let native_big = cfg!(target_endian = "big");
    let big_endian = match order {
        "<" => false,
        ">" => true,
        "|" => false,
        "=" => native_big,
        _ => return None,
    };
    let elem = match ty {
        "u1" | "b1" => Elem::U8,
        "i1" => Elem::I8,
        "u2" => Elem::U16,
        "i2" => Elem::I16,
        "u4" => Elem::U32,
        "i4" => Elem::I32,
        "u8" => Elem::U64,
        "i8" => Elem::I64,
        "f4" => Elem::F32,
        "f8" => Elem::F64,
        _ => return None,
    };
    Some((big_endian, elem))
}

fn read_idx(path: &Path) -> Result<RawArray, TrainError> {
    let bytes = read_bytes(path)?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(TrainError::format(
            path,
            "not an IDX file (the magic number must start with two zero bytes)",
        ));
    }
    let elem = match bytes[2] {
        0x08 => Elem::U8,
        0x09 => Elem::I8,
        0x0B => Elem::I16,
        0x0C => Elem::I32,
        0x0D => Elem::F32,
        0x0E => Elem::F64,
        t => {
            return Err(TrainError::format(
                path,
                format!("unknown IDX data type 0x{t:02X}"),
            ));
        }
    };
    let ndim = usize::from(bytes[3]);
    let offset = 4 + 4 * ndim;
    let dims = bytes.get(4..offset).ok_or_else(|| {
        TrainError::format(
            path,
            format!("truncated header: {ndim} dimensions announced"),
        )
    })?;
    let shape: Vec<usize> = dims
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    check_size(path, &shape, elem, bytes.len() - offset)?;
    Ok(RawArray {
        shape,
        elem,
        big_endian: true,
        bytes,
        offset,
    })
}

/// Samples × features from an array with at least 2 dimensions.
fn read_features(path: &Path, arr: RawArray) -> Result<(usize, usize, Vec<f32>), TrainError> {
    if arr.shape.len() < 2 {
        return Err(TrainError::format(
            path,
            format!(
                "features must have at least 2 dimensions (samples × features), found shape {:?}",
                arr.shape
            ),
        ));
    }
    let n = arr.shape[0];
    let d: usize = arr.shape[1..].iter().product();
    if n == 0 || d == 0 {
        return Err(TrainError::format(
            path,
            format!("no data: shape {:?}", arr.shape),
        ));
    }
    let mut features = Vec::with_capacity(n * d);
    let mut non_finite = None;
    arr.for_each(|v| {
        if !v.is_finite() && non_finite.is_none() {
            non_finite = Some(features.len());
        }
        features.push(v as f32);
    });
    if let Some(i) = non_finite {
        return Err(TrainError::format(
            path,
            format!("sample {}, feature {} is not a finite number", i / d, i % d),
        ));
    }
    Ok((n, d, features))
}

/// Integer labels from a 1-D array (or n × 1).
fn read_labels(path: &Path, arr: RawArray) -> Result<Vec<u32>, TrainError> {
    if !matches!(arr.shape.as_slice(), [_] | [_, 1]) {
        return Err(TrainError::format(
            path,
            format!("labels must be a 1-D array, found shape {:?}", arr.shape),
        ));
    }
    let mut labels = Vec::with_capacity(arr.shape[0]);
    let mut bad = None;
    arr.for_each(|v| match float_label(v) {
        Some(l) if bad.is_none() => labels.push(l),
        Some(_) => {}
        None => {
            if bad.is_none() {
                bad = Some((labels.len(), v));
            }
        }
    });
    if let Some((i, v)) = bad {
        let kind = if arr.elem.is_integer() {
            "is not a non-negative 32-bit integer"
        } else {
            "is not a non-negative integer (labels should be an integer array)"
        };
        return Err(TrainError::format(path, format!("label {i}: {v} {kind}")));
    }
    Ok(labels)
}

fn join(
    path: &Path,
    labels_path: &Path,
    n: usize,
    d: usize,
    features: Vec<f32>,
    labels: Vec<u32>,
) -> Result<Dataset, TrainError> {
    if labels.len() != n {
        return Err(TrainError::format(
            labels_path,
            format!(
                "has {} labels but {} has {n} samples",
                labels.len(),
                path.display()
            ),
        ));
    }
    Ok(Dataset {
        features,
        labels,
        n,
        d,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn digits_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/digits.csv")
    }

    #[test]
    fn loads_bundled_digits() {
        let ds = load_dataset(&digits_path(), DataFormat::Csv, None, Some(1.0 / 16.0)).unwrap();
        assert_eq!((ds.n, ds.d), (1797, 64));
        assert_eq!(ds.features.len(), 1797 * 64);
        assert_eq!(ds.max_label(), Some(9));
        assert_eq!(ds.classes(), 10);
        for c in 0..10 {
            assert!(ds.labels.contains(&c), "class {c} missing");
        }
        let max = ds.features.iter().copied().fold(f32::MIN, f32::max);
        assert!((max - 1.0).abs() < 1e-6, "scaled max {max}");
        // First row of the file: 0,0,5,13,... label 0.
        assert_eq!(ds.features[2], 5.0 / 16.0);
        assert_eq!(ds.labels[0], 0);
    }

    #[test]
    fn csv_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.csv");
        fs::write(&p, "a,b,label\n1,2,0\n3,4,1\n5,6\n").unwrap();
        let e = load_dataset(&p, DataFormat::Csv, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.csv line 4: expected 3 columns, found 2"),
            "{e}"
        );

        fs::write(&p, "1,2,0\n3,x,1\n").unwrap();
        let e = load_dataset(&p, DataFormat::Csv, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.csv line 2: column 2: \"x\""), "{e}");

        fs::write(&p, "1,2,0\n\n3,4,-1\n").unwrap();
        let e = load_dataset(&p, DataFormat::Csv, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.csv line 3: label (column 3)"), "{e}");

        fs::write(&p, "a,b,label\n").unwrap();
        let e = load_dataset(&p, DataFormat::Csv, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.csv: no data rows"), "{e}");

        let e = load_dataset(&dir.path().join("missing.csv"), DataFormat::Csv, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.csv"), "{e}");
    }

    #[test]
    fn csv_without_header_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plain.csv");
        fs::write(&p, "0.5,1,2\r\n-1.25,3,1.0\r\n").unwrap();
        let ds = load_dataset(&p, DataFormat::Csv, None, Some(2.0)).unwrap();
        assert_eq!((ds.n, ds.d), (2, 2));
        assert_eq!(ds.features, vec![1.0, 2.0, -2.5, 6.0]);
        assert_eq!(ds.labels, vec![2, 1]);

        let out = dir.path().join("out.csv");
        write_csv(&ds, &out).unwrap();
        let text = fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("f0,f1,label\n"), "{text}");
        let back = load_dataset(&out, DataFormat::Csv, None, None).unwrap();
        assert_eq!(back, ds);
        assert_eq!(ds.subset(&[1]).features, vec![-2.5, 6.0]);
    }

    fn npy(descr: &str, shape: &str, data: &[u8], version: u8) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let pre = if version == 1 { 10 } else { 12 };
        while (pre + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend([version, 0]);
        if version == 1 {
            out.extend((header.len() as u16).to_le_bytes());
        } else {
            out.extend((header.len() as u32).to_le_bytes());
        }
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn loads_npy_pair() {
        let dir = tempfile::tempdir().unwrap();
        let x = dir.path().join("x.npy");
        let y = dir.path().join("y.npy");
        // 3 samples of 2×2, f4.
        let vals: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&x, npy("<f4", "(3, 2, 2)", &bytes, 1)).unwrap();
        let labels: Vec<u8> = [2i64, 0, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&y, npy("<i8", "(3,)", &labels, 2)).unwrap();
        let ds = load_dataset(&x, DataFormat::Npy, Some(&y), Some(0.5)).unwrap();
        assert_eq!((ds.n, ds.d), (3, 4));
        assert_eq!(ds.features[5], 2.5);
        assert_eq!(ds.labels, vec![2, 0, 1]);

        // u8 features, i4 labels.
        fs::write(&x, npy("|u1", "(2, 3)", &[1, 2, 3, 4, 5, 255], 1)).unwrap();
        let labels: Vec<u8> = [7i32, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&y, npy("<i4", "(2,)", &labels, 1)).unwrap();
        let ds = load_dataset(&x, DataFormat::Npy, Some(&y), None).unwrap();
        assert_eq!(ds.features, vec![1.0, 2.0, 3.0, 4.0, 5.0, 255.0]);
        assert_eq!(ds.labels, vec![7, 9]);

        // f8 features; errors name the file.
        let bytes: Vec<u8> = [0.5f64, 1.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&x, npy("<f8", "(2, 1)", &bytes, 1)).unwrap();
        let ds = load_dataset(&x, DataFormat::Npy, Some(&y), None).unwrap();
        assert_eq!(ds.features, vec![0.5, 1.5]);

        fs::write(&y, npy("<i4", "(3,)", &[0; 12], 1)).unwrap();
        let e = load_dataset(&x, DataFormat::Npy, Some(&y), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("y.npy: has 3 labels but") && e.contains("x.npy has 2"),
            "{e}"
        );
        fs::write(&x, npy("<c8", "(2, 1)", &[0; 16], 1)).unwrap();
        let e = load_dataset(&x, DataFormat::Npy, Some(&y), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.npy: unsupported npy dtype \"<c8\""), "{e}");
        fs::write(&x, npy("<f4", "(2, 2)", &[0; 12], 1)).unwrap();
        let e = load_dataset(&x, DataFormat::Npy, Some(&y), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 16 bytes of data, found 12"), "{e}");
        let e = load_dataset(&x, DataFormat::Npy, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("labels") && e.contains("x.npy"), "{e}");
    }

    #[test]
    fn loads_idx_pair() {
        let dir = tempfile::tempdir().unwrap();
        let x = dir.path().join("images-idx3-ubyte");
        let y = dir.path().join("labels-idx1-ubyte");
        let mut img = vec![0, 0, 0x08, 3];
        for dim in [2u32, 2, 2] {
            img.extend(dim.to_be_bytes());
        }
        img.extend([0, 51, 102, 255, 255, 0, 0, 0]);
        fs::write(&x, &img).unwrap();
        let mut lab = vec![0, 0, 0x08, 1];
        lab.extend(2u32.to_be_bytes());
        lab.extend([3, 8]);
        fs::write(&y, &lab).unwrap();
        let ds = load_dataset(&x, DataFormat::Idx, Some(&y), None).unwrap();
        assert_eq!((ds.n, ds.d), (2, 4));
        assert!((ds.features[1] - 0.2).abs() < 1e-6);
        assert_eq!(ds.features[3], 1.0);
        assert_eq!(ds.labels, vec![3, 8]);

        fs::write(&y, &lab[..lab.len() - 1]).unwrap();
        let e = load_dataset(&x, DataFormat::Idx, Some(&y), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("labels-idx1-ubyte: shape [2] of U8 needs 2 bytes"),
            "{e}"
        );
        fs::write(&y, &lab).unwrap();
        let e = load_dataset(&y, DataFormat::Idx, Some(&y), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 2 dimensions"), "{e}");
    }

    #[test]
    fn format_from_str() {
        assert_eq!("npy".parse::<DataFormat>().unwrap(), DataFormat::Npy);
        let e = "parquet".parse::<DataFormat>().unwrap_err().to_string();
        assert!(e.contains("\"parquet\""), "{e}");
    }
}
