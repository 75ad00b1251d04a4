//! What a party is asked to do in a round.

/// The kind of a task offered to a party.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// Fetch the global model, train on local data, submit the update.
    Train,
    /// Fetch the global model, evaluate it on local held-out data.
    Evaluate,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Train => "train",
            TaskKind::Evaluate => "evaluate",
        }
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
