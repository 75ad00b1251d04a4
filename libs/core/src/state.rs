//! Job states and the transitions allowed between them (DESIGN §3).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Starting,
    Running,
    Stopping,
    Succeeded,
    Failed,
    Stopped,
    Deleting,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Starting,
        JobState::Running,
        JobState::Stopping,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Stopped,
        JobState::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Starting => "STARTING",
            JobState::Running => "RUNNING",
            JobState::Stopping => "STOPPING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Stopped => "STOPPED",
            JobState::Deleting => "DELETING",
        }
    }

    /// SUCCEEDED, FAILED and STOPPED: the job will not run again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Stopped
        )
    }

    /// A coordinator process should exist for the job.
    pub fn has_coordinator(self) -> bool {
        matches!(
            self,
            JobState::Starting | JobState::Running | JobState::Stopping
        )
    }

    /// Whether `self -> to` is a legal transition.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (Queued, Starting | Stopped | Failed) => true,
            // Starting -> Starting: a coordinator that died before it was ready is relaunched.
            (Starting, Starting | Running | Stopping | Failed | Succeeded) => true,
            // Running -> Starting: its coordinator died and is relaunched from the checkpoint.
            (Running, Starting | Stopping | Succeeded | Failed) => true,
            (Stopping, Stopped | Failed | Succeeded) => true,
            (Succeeded | Failed | Stopped, Deleting) => true,
            _ => false,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = crate::CoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.to_ascii_uppercase();
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == upper)
            .ok_or_else(|| crate::CoreError::InvalidState(s.chars().take(40).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_only_go_to_deleting() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobState::ALL {
                assert_eq!(
                    from.can_become(to),
                    to == JobState::Deleting,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn lifecycle_paths() {
        use JobState::*;
        for (a, b) in [
            (Queued, Starting),
            (Starting, Running),
            (Running, Succeeded),
            (Running, Stopping),
            (Stopping, Stopped),
            (Running, Starting),
        ] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
        assert!(!Succeeded.can_become(Running));
        assert!(!Queued.can_become(Running));
    }

    #[test]
    fn parse_round_trips() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().ok(), Some(s));
        }
        assert_eq!("running".parse::<JobState>().ok(), Some(JobState::Running));
        assert!("nope".parse::<JobState>().is_err());
    }
}
