//! `training.runtime: command`: the program a party runs to train or evaluate, its limits,
//! and the party's allow-list of programs (`--allowed-commands`), which task-manager checks
//! at the offer and the executor again before running anything.

use super::{Arch, JobSpec, Runtime, SpecError, Strategy};

/// Most words a `training.command` may have.
pub const MAX_COMMAND_ARGS: usize = 64;
/// Longest word of a `training.command`, in bytes.
pub const MAX_COMMAND_ARG_BYTES: usize = 4096;

impl JobSpec {
    /// `training.command` is given exactly when `training.runtime` is `command`, and is a
    /// bounded argv the coordinator's model layout still describes (`model.arch`).
    pub(super) fn validate_command(&self) -> Result<(), SpecError> {
        let training = &self.training;
        let Some(argv) = &training.command else {
            if training.runtime == Runtime::Command {
                return Err(SpecError::new(
                    "training.command",
                    "runtime \"command\" needs the program to run, as a list: [\"python3\", \
                     \"train.py\"]",
                ));
            }
            return Ok(());
        };
        if training.runtime != Runtime::Command {
            return Err(SpecError::new(
                "training.command",
                "only runtime \"command\" runs a command; set training.runtime: command",
            ));
        }
        check_argv(argv).map_err(|m| SpecError::new("training.command", m))?;
        if self.model.arch == Arch::Synthetic {
            return Err(SpecError::new(
                "training.runtime",
                "the synthetic workload trains nothing: it takes runtime \"candle\"",
            ));
        }
        if self.aggregation.strategy == Strategy::Scaffold {
            return Err(SpecError::new(
                "aggregation.strategy",
                "scaffold's control variates are kept by Cohort's own trainer: it takes \
                 runtime \"candle\"",
            ));
        }
        Ok(())
    }
}

/// Why `argv` is not a command line Cohort runs: empty, too many or too long words, NUL.
pub fn check_argv(argv: &[String]) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Err("is empty: name the program to run first".into());
    };
    if program.is_empty() {
        return Err("the program (first word) is empty".into());
    }
    if argv.len() > MAX_COMMAND_ARGS {
        return Err(format!(
            "has {} words, more than {MAX_COMMAND_ARGS}",
            argv.len()
        ));
    }
    for (i, word) in argv.iter().enumerate() {
        if word.len() > MAX_COMMAND_ARG_BYTES {
            return Err(format!(
                "word {i} is {} bytes long, more than {MAX_COMMAND_ARG_BYTES}",
                word.len()
            ));
        }
        if word.contains('\0') {
            return Err(format!("word {i} contains a NUL character"));
        }
    }
    Ok(())
}

/// The commands a party lets jobs run (`--allowed-commands`): argv prefixes. A job's
/// `training.command` is allowed when it starts with one of them word for word, so
/// `["python3", "/opt/train.py"]` allows `python3 /opt/train.py --epochs 3` but not
/// `python3 -c ...`. Empty: no command at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedCommands {
    prefixes: Vec<Vec<String>>,
}

impl AllowedCommands {
    /// From a JSON list of argv prefixes, `[["python3", "/opt/train.py"]]`; `""` or `[]`:
    /// none. Errors say which entry is wrong.
    pub fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let prefixes: Vec<Vec<String>> = serde_json::from_str(json).map_err(|e| {
            format!(
                "expected a JSON list of argv prefixes, [[\"python3\", \"/opt/train.py\"]]: {e}"
            )
        })?;
        for (i, prefix) in prefixes.iter().enumerate() {
            check_argv(prefix).map_err(|m| format!("entry {i} {m}"))?;
        }
        Ok(Self { prefixes })
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The list as `parse` reads it (to hand on to an executor).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.prefixes).unwrap_or_else(|_| "[]".into())
    }

    /// Why this party does not run `argv`, if it does not.
    pub fn refusal(&self, argv: &[String]) -> Option<String> {
        if self
            .prefixes
            .iter()
            .any(|p| argv.len() >= p.len() && argv[..p.len()] == p[..])
        {
            return None;
        }
        let shown: Vec<String> = argv.iter().take(8).map(|w| bounded(w)).collect();
        Some(if self.prefixes.is_empty() {
            format!(
                "this party runs no training command (its --allowed-commands is empty); \
                 refused training.command {shown:?}"
            )
        } else {
            format!(
                "training.command {shown:?} is not in this party's --allowed-commands \
                 (allowed: {} argv prefix(es))",
                self.prefixes.len()
            )
        })
    }
}

fn bounded(word: &str) -> String {
    if word.chars().count() > 80 {
        format!("{}…", word.chars().take(80).collect::<String>())
    } else {
        word.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn an_allowed_prefix_admits_its_extensions_only() {
        let allowed = AllowedCommands::parse(r#"[["python3", "/opt/train.py"]]"#).unwrap();
        assert_eq!(allowed.refusal(&argv(&["python3", "/opt/train.py"])), None);
        assert_eq!(
            allowed.refusal(&argv(&["python3", "/opt/train.py", "--lr", "1"])),
            None
        );
        let refused = allowed
            .refusal(&argv(&["python3", "-c", "import os"]))
            .unwrap();
        assert!(
            refused.contains("not in this party's --allowed-commands"),
            "{refused}"
        );
        assert!(allowed.refusal(&argv(&["python3"])).is_some());
        assert!(allowed.refusal(&argv(&["/opt/train.py"])).is_some());
        let none = AllowedCommands::parse("[]").unwrap();
        assert!(none.is_empty());
        let refused = none.refusal(&argv(&["python3", "/opt/train.py"])).unwrap();
        assert!(refused.contains("runs no training command"), "{refused}");
        assert_eq!(AllowedCommands::parse(" ").unwrap(), none);
        assert_eq!(AllowedCommands::parse(&allowed.to_json()).unwrap(), allowed);
    }

    #[test]
    fn malformed_allow_lists_are_refused_naming_the_entry() {
        assert!(AllowedCommands::parse("python3").is_err());
        let e = AllowedCommands::parse(r#"[["python3"], []]"#).unwrap_err();
        assert!(e.contains("entry 1 is empty"), "{e}");
        let e = AllowedCommands::parse(r#"[["py\u0000"]]"#).unwrap_err();
        assert!(e.contains("NUL"), "{e}");
    }

    #[test]
    fn a_command_job_names_its_command_and_only_it_does() {
        let spec = |training: &str, extra: &str| {
            format!(
                "name: c\nmodel: {{arch: logreg}}\ndata: {{dataset: digits}}\n\
                 training: {training}\nclients: {{per_round: 2, min: 2}}\n{extra}"
            )
        };
        let ok = JobSpec::parse(&spec(
            "{runtime: command, command: [python3, train.py]}",
            "",
        ))
        .unwrap();
        assert_eq!(ok.training.command, Some(argv(&["python3", "train.py"])));
        assert_eq!(JobSpec::from_json(&ok.to_json()).unwrap(), ok);
        let candle = JobSpec::parse(&spec("{epochs: 1}", "")).unwrap();
        assert!(
            !candle.to_json().contains("command"),
            "{}",
            candle.to_json()
        );
        let field = |training: &str, extra: &str| match JobSpec::parse(&spec(training, extra)) {
            Ok(_) => panic!("accepted: {training} {extra}"),
            Err(e) => (e.field, e.message),
        };
        for (training, extra, want, says) in [
            (
                "{runtime: command}",
                "",
                "training.command",
                "needs the program",
            ),
            (
                "{runtime: command, command: []}",
                "",
                "training.command",
                "is empty",
            ),
            (
                "{command: [python3]}",
                "",
                "training.command",
                "only runtime",
            ),
            (
                "{runtime: command, command: [python3]}",
                "aggregation: {strategy: scaffold}\n",
                "aggregation.strategy",
                "scaffold",
            ),
        ] {
            let (field, message) = field(training, extra);
            assert_eq!(field, want, "{training} {extra}: {message}");
            assert!(message.contains(says), "{message}");
        }
    }

    #[test]
    fn argv_limits() {
        assert!(check_argv(&argv(&["python3", "train.py"])).is_ok());
        assert!(check_argv(&[]).is_err());
        assert!(check_argv(&argv(&[""])).is_err());
        assert!(check_argv(&vec!["x".to_string(); MAX_COMMAND_ARGS + 1]).is_err());
        assert!(check_argv(&["y".repeat(MAX_COMMAND_ARG_BYTES + 1)]).is_err());
    }
}
