//! Incremental safetensors validation, fed chunk by chunk as an upload
//! streams in: the header is parsed (and validated by the `safetensors` crate)
//! as soon as it has arrived, and the total length is checked at the end, so
//! the file is never held in memory. Only the JSON header is buffered, and
//! never more of it than `max_header_len`; the file is never allowed past
//! `max_total` bytes.

/// `safetensors`' own bound on the JSON header: a longer one is not a
/// safetensors file, whatever `max_header_len` allows.
pub(crate) const SAFETENSORS_MAX_HEADER_LEN: u64 = 100_000_000;

/// Why an upload is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a valid safetensors file.
    Invalid(String),
    /// Over one of model-manager's limits; the message names the flag.
    TooLarge(String),
}

#[derive(Debug)]
pub(crate) struct SafetensorsCheck {
    max_header_len: u64,
    max_total: u64,
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
    /// A check that refuses headers over `max_header_len` bytes and files
    /// over `max_total` bytes.
    pub fn new(max_header_len: u64, max_total: u64) -> Self {
        Self {
            max_header_len,
            max_total,
            header: Vec::new(),
            header_len: None,
            expected_total: None,
            tensors: 0,
            seen: 0,
        }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), Refusal> {
        self.seen += chunk.len() as u64;
        if self.seen > self.max_total {
            return Err(Refusal::TooLarge(format!(
                "the upload is larger than the {} bytes model-manager accepts \
                 (--max-upload-bytes)",
                self.max_total
            )));
        }
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
            Some(total) if self.seen > total => Err(Refusal::Invalid(format!(
                "file is longer than its header declares ({total} bytes)"
            ))),
            _ => Ok(()),
        }
    }

    fn read_length_prefix(&mut self) -> Result<(), Refusal> {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.header[..8]);
        let n = u64::from_le_bytes(prefix);
        if n > SAFETENSORS_MAX_HEADER_LEN {
            // Text and other non-safetensors files end up here.
            return Err(Refusal::Invalid(format!(
                "header length {n} exceeds the format's {SAFETENSORS_MAX_HEADER_LEN}-byte limit"
            )));
        }
        if n > self.max_header_len {
            return Err(Refusal::TooLarge(format!(
                "the safetensors header is {n} bytes, over the {}-byte limit \
                 (--max-safetensors-header-bytes)",
                self.max_header_len
            )));
        }
        self.header_len = Some(n);
        Ok(())
    }

    fn parse_header(&mut self, n: u64) -> Result<(), Refusal> {
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&self.header[8..])
            .map_err(|e| Refusal::Invalid(format!("invalid header: {e}")))?;
        self.tensors = metadata.tensors().len();
        let total = (8 + n).saturating_add(metadata.data_len() as u64);
        // Refused as soon as the header says so, not after max_total bytes.
        if total > self.max_total {
            return Err(Refusal::TooLarge(format!(
                "the file's header declares {total} bytes, over the {} bytes model-manager \
                 accepts (--max-upload-bytes)",
                self.max_total
            )));
        }
        self.expected_total = Some(total);
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

    const UNLIMITED: u64 = u64::MAX;

    fn check_with(
        data: &[u8],
        chunk: usize,
        max_header_len: u64,
        max_total: u64,
    ) -> Result<Summary, Refusal> {
        let mut c = SafetensorsCheck::new(max_header_len, max_total);
        for part in data.chunks(chunk) {
            c.feed(part)?;
        }
        c.finish().map_err(Refusal::Invalid)
    }

    /// The reason an invalid file is refused.
    fn check_in_chunks(data: &[u8], chunk: usize) -> Result<Summary, String> {
        check_with(data, chunk, 1 << 20, UNLIMITED).map_err(|r| match r {
            Refusal::Invalid(m) => m,
            Refusal::TooLarge(m) => panic!("refused as too large: {m}"),
        })
    }

    /// The reason an oversized file is refused.
    fn too_large(data: &[u8], chunk: usize, max_header_len: u64, max_total: u64) -> String {
        match check_with(data, chunk, max_header_len, max_total) {
            Err(Refusal::TooLarge(m)) => m,
            other => panic!("expected TooLarge, got {other:?}"),
        }
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

    #[test]
    fn refuses_files_over_the_limits_as_soon_as_they_show() {
        let data = sample();
        let header_len = u64::from_le_bytes(data[..8].try_into().unwrap());
        // Exactly at the limits passes.
        let s = check_with(&data, 5, header_len, data.len() as u64).unwrap();
        assert_eq!(s.size, data.len() as u64);

        // A header one byte over its bound: refused on the length prefix,
        // before any of it is buffered.
        let m = too_large(&data[..8], 8, header_len - 1, UNLIMITED);
        assert!(m.contains("--max-safetensors-header-bytes"), "{m}");
        assert!(m.contains(&format!("{}-byte", header_len - 1)), "{m}");
        // Past safetensors' own bound it is not a safetensors file at all.
        let huge = (SAFETENSORS_MAX_HEADER_LEN + 1).to_le_bytes();
        match check_with(&huge, 8, UNLIMITED, UNLIMITED) {
            Err(Refusal::Invalid(m)) => assert!(m.contains("100000000-byte"), "{m}"),
            other => panic!("expected Invalid, got {other:?}"),
        }

        // A file whose header declares more than the upload limit: refused
        // once the header is in, with no data sent yet.
        let header_end = 8 + header_len as usize;
        let m = too_large(&data[..header_end], 4, UNLIMITED, data.len() as u64 - 1);
        assert!(m.contains("--max-upload-bytes"), "{m}");
        assert!(m.contains(&format!("declares {} bytes", data.len())), "{m}");

        // Bytes past the limit before the header is complete.
        let mut slow = (1u64 << 20).to_le_bytes().to_vec();
        slow.extend_from_slice(&[b' '; 100]);
        let m = too_large(&slow, 10, 1 << 20, 64);
        assert!(m.contains("larger than the 64 bytes"), "{m}");
        assert!(m.contains("--max-upload-bytes"), "{m}");
    }
}
