//! Updates staged on disk while they stream in: the coordinator keeps no update whole in
//! memory. Each checked chunk's bytes are appended to an unnamed temporary file (gone with
//! its handle, also when the process dies); the fold reads them back a chunk at a time,
//! from the page cache as a rule.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use cohort_fl::{FlError, UpdateValues};

/// One update's chunks, in the order they came.
pub struct StagedUpdate {
    file: File,
    /// (tensor, element offset, elements) of each chunk, stored back to back.
    pieces: Vec<(usize, usize, usize)>,
    largest: usize,
}

impl StagedUpdate {
    /// A new, empty staging file in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<StagedUpdate> {
        Ok(StagedUpdate {
            file: tempfile::tempfile_in(dir)?,
            pieces: Vec::new(),
            largest: 0,
        })
    }

    /// Appends a checked chunk's little-endian f32 bytes.
    pub fn append(&mut self, tensor: usize, offset: usize, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.pieces.push((tensor, offset, bytes.len() / 4));
        self.largest = self.largest.max(bytes.len());
        Ok(())
    }
}

impl UpdateValues for StagedUpdate {
    fn visit(&mut self, f: &mut dyn FnMut(usize, usize, &[f32])) -> Result<(), FlError> {
        let io = |e: std::io::Error| FlError::Staging(e.to_string());
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut bytes = vec![0u8; self.largest];
        let mut values: Vec<f32> = Vec::with_capacity(self.largest / 4);
        for &(tensor, offset, len) in &self.pieces {
            let bytes = &mut bytes[..len * 4];
            self.file.read_exact(bytes).map_err(io)?;
            values.clear();
            cohort_fl::wire::extend_from_le_bytes(&mut values, bytes);
            f(tensor, offset, &values);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pieces_come_back_as_appended() {
        let dir = tempfile::tempdir().unwrap();
        let mut staged = StagedUpdate::create(dir.path()).unwrap();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        staged.append(1, 0, &bytes(&[1.0, 2.0, 3.0])).unwrap();
        staged.append(1, 3, &bytes(&[4.0])).unwrap();
        staged.append(0, 0, &bytes(&[-1.5, 0.25])).unwrap();
        // The file has no name: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        for _ in 0..2 {
            let mut seen = Vec::new();
            staged
                .visit(&mut |t, o, v| seen.push((t, o, v.to_vec())))
                .unwrap();
            assert_eq!(
                seen,
                vec![
                    (1, 0, vec![1.0, 2.0, 3.0]),
                    (1, 3, vec![4.0]),
                    (0, 0, vec![-1.5, 0.25])
                ]
            );
        }
    }
}
