use std::path::PathBuf;

/// Everything that can go wrong loading data or training; each message names the file,
/// line, field or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A CSV file with a bad row (line numbers are 1-based, header included).
    #[error("{} line {line}: {message}", path.display())]
    Csv {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A data file whose content is malformed or unsupported.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("unknown data format {0:?}: expected \"csv\", \"npy\" or \"idx\"")]
    UnknownFormat(String),
    /// A bad argument or spec value; `field` is the spec field or parameter name.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Weights that do not fit the model the spec describes.
    #[error("weights: tensor {tensor:?}: {message}")]
    Weights { tensor: String, message: String },
    #[error(
        "data: sample {index} has label {label} but the model has {classes} output classes \
         (labels must be below {classes})"
    )]
    Label {
        index: usize,
        label: u32,
        classes: usize,
    },
    #[error("training diverged in epoch {epoch}: loss is {loss}; lower training.optimizer.lr")]
    Diverged { epoch: u32, loss: f64 },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn format(path: &std::path::Path, message: impl Into<String>) -> Self {
        TrainError::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(crate) fn weights(tensor: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Weights {
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}
