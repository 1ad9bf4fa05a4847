//! A case: its madsim seed, whether the planted bug is switched on, and its operations. Cases
//! are written as JSON when they fail and read back by `ci/model --replay FILE`.

use crate::ops::Op;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    pub seed: u64,
    /// Runs with `debug.bug.leak_ip_on_create_rollback` on (the suite's proof of teeth).
    #[serde(default)]
    pub planted_bug: bool,
    pub ops: Vec<Op>,
    /// What broke, when the case was written because it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl Case {
    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Read a replay file; a malformed one is an error naming the file and what is wrong.
    pub fn load(path: &Path) -> Result<Case, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let case: Case = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}: line {} column {}: {e}",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        crate::model::valid_sequence(case.seed, &case.ops)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(case)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{Offering, Tenant, VmAction};
    use stratus_agent_protocol::CommandKind;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("stratus-case-{}", std::process::id()));
        let path = dir.join("case.json");
        let case = Case {
            seed: 7,
            planted_bug: true,
            ops: vec![
                Op::FailNext {
                    kind: CommandKind::VmStart,
                    n: 1,
                },
                Op::CreateVm {
                    offering: Offering::Small,
                    static_ip: Some(3),
                    tenant: Tenant::A,
                },
                Op::Vm {
                    vm: 0,
                    action: VmAction::Stop,
                    foreign: true,
                },
            ],
            failure: Some("x".into()),
        };
        case.save(&path).unwrap();
        assert_eq!(Case::load(&path).unwrap(), case);
        std::fs::write(&path, "{\"seed\": 1, \"ops\": [{\"op\": \"fly\"}]}").unwrap();
        let e = Case::load(&path).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        std::fs::write(
            &path,
            "{\"seed\": 1, \"ops\": [{\"op\": \"restart_mgmt\"}]}",
        )
        .unwrap();
        let e = Case::load(&path).unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
