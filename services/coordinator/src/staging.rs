//! Updates staged on disk while they stream in: the coordinator keeps no update whole in
//! memory. Each checked chunk's bytes are appended to an unnamed temporary file (gone with
//! its handle, also when the process dies); the fold reads them back a block at a time,
//! from the page cache as a rule.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cohort_fl::{FlError, UpdateValues};

/// One update's chunks, in the order they came: a tensor's chunks follow each other in
/// order (the update's check refuses anything else), so each tensor lies in one run of
/// the file.
pub struct StagedUpdate {
    file: File,
    /// Per tensor index: (byte position of its first element, elements written so far).
    tensors: Vec<Option<(u64, usize)>>,
    /// Bytes written so far.
    written: u64,
}

impl StagedUpdate {
    /// A new, empty staging file in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<StagedUpdate> {
        Ok(StagedUpdate {
            file: tempfile::tempfile_in(dir)?,
            tensors: Vec::new(),
            written: 0,
        })
    }

    /// Appends a checked chunk's little-endian f32 bytes: elements `offset..` of `tensor`,
    /// which must continue the last chunk written (or start a tensor not seen yet).
    pub fn append(&mut self, tensor: usize, offset: usize, bytes: &[u8]) -> std::io::Result<()> {
        if self.tensors.len() <= tensor {
            self.tensors.resize(tensor + 1, None);
        }
        let continues = match self.tensors[tensor] {
            None => offset == 0,
            Some((start, len)) => len == offset && start + 4 * len as u64 == self.written,
        };
        if !continues || !bytes.len().is_multiple_of(4) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("chunk of tensor {tensor} at element {offset} does not continue it"),
            ));
        }
        self.file.write_all(bytes)?;
        let (start, len) = self.tensors[tensor].unwrap_or((self.written, 0));
        self.tensors[tensor] = Some((start, len + bytes.len() / 4));
        self.written += bytes.len() as u64;
        Ok(())
    }
}

impl UpdateValues for StagedUpdate {
    fn read<'a>(
        &'a self,
        tensor: usize,
        offset: usize,
        buf: &'a mut [f32],
    ) -> Result<&'a [f32], FlError> {
        let staged = self.tensors.get(tensor).copied().flatten();
        let Some((start, len)) = staged.filter(|(_, len)| offset + buf.len() <= *len) else {
            return Err(FlError::Staging(format!(
                "elements {offset}..{} of tensor {tensor} were not staged",
                offset + buf.len()
            )));
        };
        let at = start + 4 * offset as u64;
        cohort_fl::wire::fill_from_le(buf, |bytes| self.file.read_exact_at(bytes, at))
            .map_err(|e| FlError::Staging(format!("{e} (tensor {tensor} of {len} elements)")))?;
        Ok(buf)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges_come_back_as_appended() {
        let dir = tempfile::tempdir().unwrap();
        let mut staged = StagedUpdate::create(dir.path()).unwrap();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        staged.append(1, 0, &bytes(&[1.0, 2.0, 3.0])).unwrap();
        staged.append(1, 3, &bytes(&[4.0])).unwrap();
        staged.append(0, 0, &bytes(&[-1.5, 0.25])).unwrap();
        // The file has no name: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let read = |staged: &StagedUpdate, t: usize, o: usize, n: usize| {
            let mut buf = vec![0f32; n];
            staged.read(t, o, &mut buf).map(|v| v.to_vec())
        };
        assert_eq!(read(&staged, 1, 0, 4).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(read(&staged, 1, 2, 2).unwrap(), vec![3.0, 4.0]);
        assert_eq!(read(&staged, 0, 0, 2).unwrap(), vec![-1.5, 0.25]);
        assert_eq!(read(&staged, 0, 1, 1).unwrap(), vec![0.25]);
        assert!(read(&staged, 0, 1, 2).is_err(), "past the tensor's end");
        assert!(read(&staged, 2, 0, 1).is_err(), "a tensor never staged");
        // Out of order is refused, and changes nothing.
        assert!(
            staged.append(1, 4, &bytes(&[5.0])).is_err(),
            "tensor 1 was left"
        );
        assert!(staged.append(0, 0, &bytes(&[5.0])).is_err(), "sent twice");
        assert!(
            staged.append(3, 1, &bytes(&[5.0])).is_err(),
            "not from its start"
        );
        assert_eq!(read(&staged, 0, 0, 2).unwrap(), vec![-1.5, 0.25]);
        staged.append(0, 2, &bytes(&[7.0])).unwrap();
        assert_eq!(read(&staged, 0, 0, 3).unwrap(), vec![-1.5, 0.25, 7.0]);
    }
}
