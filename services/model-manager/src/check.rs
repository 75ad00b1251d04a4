//! Incremental safetensors validation, fed chunk by chunk as an upload
//! streams in: the header is parsed (and validated by the `safetensors` crate)
//! as soon as it has arrived, and the total length is checked at the end, so
//! the file is never held in memory.

/// `safetensors`' own bound on the JSON header.
const MAX_HEADER_LEN: u64 = 100_000_000;

#[derive(Debug, Default)]
pub(crate) struct SafetensorsCheck {
    /// The 8-byte length prefix and then the JSON header, until parsed.
    header: Vec<u8>,
    header_len: Option<u64>,
    /// Set once the header is parsed: 8 + header + data section.
    expected_total: Option<u64>,
    tensors: usize,
    seen: u64,
}

/// What a valid upload contained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Summary {
    pub tensors: usize,
    pub size: u64,
}

impl SafetensorsCheck {
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        self.seen += chunk.len() as u64;
        while self.expected_total.is_none() {
            let need = 8 + self.header_len.unwrap_or(0);
            let missing = need - self.header.len() as u64;
            let take = usize::try_from(missing)
                .unwrap_or(usize::MAX)
                .min(chunk.len());
            self.header.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if (self.header.len() as u64) < need {
                return Ok(());
            }
            match self.header_len {
                None => self.read_length_prefix()?,
                Some(n) => self.parse_header(n)?,
            }
        }
        match self.expected_total {
            Some(total) if self.seen > total => Err(format!(
                "file is longer than its header declares ({total} bytes)"
            )),
            _ => Ok(()),
        }
    }

    fn read_length_prefix(&mut self) -> Result<(), String> {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.header[..8]);
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER_LEN {
            return Err(format!(
                "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit"
            ));
        }
        self.header_len = Some(n);
        Ok(())
    }

    fn parse_header(&mut self, n: u64) -> Result<(), String> {
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&self.header[8..])
            .map_err(|e| format!("invalid header: {e}"))?;
        self.tensors = metadata.tensors().len();
        self.expected_total = Some(8 + n + metadata.data_len() as u64);
        self.header = Vec::new();
        Ok(())
    }

    pub fn finish(&self) -> Result<Summary, String> {
        if self.seen == 0 {
            return Err("upload has no data".to_string());
        }
        match (self.header_len, self.expected_total) {
            (None, _) => Err(format!(
                "{} bytes: too short for the 8-byte header length",
                self.seen
            )),
            (Some(n), None) => Err(format!(
                "header truncated: {} bytes after the length prefix, {n} declared",
                self.seen - 8
            )),
            (Some(_), Some(total)) if self.seen != total => Err(format!(
                "data truncated: {} bytes, the header declares {total}",
                self.seen
            )),
            (Some(_), Some(total)) => Ok(Summary {
                tensors: self.tensors,
                size: total,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use safetensors::{Dtype, tensor::TensorView};

    fn sample() -> Vec<u8> {
        let w: Vec<u8> = (0..24u8).collect();
        let b: Vec<u8> = vec![1, 2, 3, 4, 5, 6, 7, 8];
        let tensors = vec![
            ("w", TensorView::new(Dtype::F32, vec![2, 3], &w).unwrap()),
            ("b", TensorView::new(Dtype::F32, vec![2], &b).unwrap()),
        ];
        safetensors::serialize(tensors, None).unwrap()
    }

    fn check_in_chunks(data: &[u8], chunk: usize) -> Result<Summary, String> {
        let mut c = SafetensorsCheck::default();
        for part in data.chunks(chunk) {
            c.feed(part)?;
        }
        c.finish()
    }

    #[test]
    fn accepts_valid_file_in_any_chunking() {
        let data = sample();
        for chunk in [1, 3, 7, 8, 9, 64, data.len()] {
            let s = check_in_chunks(&data, chunk).unwrap();
            assert_eq!(s.tensors, 2);
            assert_eq!(s.size, data.len() as u64);
        }
    }

    #[test]
    fn refuses_invalid_files() {
        let data = sample();
        assert!(check_in_chunks(&[], 4).unwrap_err().contains("no data"));
        assert!(
            check_in_chunks(&data[..5], 4)
                .unwrap_err()
                .contains("too short")
        );
        assert!(
            check_in_chunks(&data[..20], 4)
                .unwrap_err()
                .contains("header truncated")
        );
        let short = &data[..data.len() - 1];
        assert!(
            check_in_chunks(short, 4)
                .unwrap_err()
                .contains("data truncated")
        );
        let mut long = data.clone();
        long.push(0);
        assert!(check_in_chunks(&long, 4).unwrap_err().contains("longer"));
        let text = b"this is not a safetensors file at all, just text".repeat(3);
        assert!(check_in_chunks(&text, 16).is_err());
        let mut bad_json = 10u64.to_le_bytes().to_vec();
        bad_json.extend_from_slice(b"{not json}");
        assert!(
            check_in_chunks(&bad_json, 4)
                .unwrap_err()
                .contains("invalid header")
        );
        // Offsets that do not match the shape.
        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        let mut wrong = (header.len() as u64).to_le_bytes().to_vec();
        wrong.extend_from_slice(header);
        wrong.extend_from_slice(&[0; 4]);
        assert!(
            check_in_chunks(&wrong, 5)
                .unwrap_err()
                .contains("invalid header")
        );
        let mut zero = 0u64.to_le_bytes().to_vec();
        zero.extend_from_slice(b"xx");
        assert!(check_in_chunks(&zero, 3).is_err());
    }
}
