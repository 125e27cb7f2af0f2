//! Data-driven scenarios: each `fixtures/scenarios/NAME.json` is a recorded
//! command script (commands with clock advances); running it must produce
//! exactly `NAME.golden.json` — every event, every rejection, the final
//! digest. Set `UPDATE_GOLDEN=1` to rewrite the golden files after an
//! intended change, then review the diff.

use std::path::{Path, PathBuf};

use domain::testkit::Scenario;
use domain::{Command, Event};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Script {
    description: String,
    steps: Vec<ScriptStep>,
}

#[derive(Deserialize)]
struct ScriptStep {
    #[serde(default)]
    advance_ms: u64,
    #[serde(default)]
    command: Option<Command>,
    #[serde(default)]
    fire_timers: bool,
}

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/scenarios")
}

fn run(script: &Script) -> Value {
    let mut s = Scenario::new();
    let mut outputs = Vec::new();
    for step in &script.steps {
        s.advance_ms(step.advance_ms);
        let at_us = s.now.as_micros();
        if step.fire_timers {
            let events: Vec<Event> = s.fire_timers();
            outputs.push(json!({ "at_us": at_us, "timers_fired": events }));
        }
        if let Some(command) = &step.command {
            let kind = command.kind();
            outputs.push(match s.when(command.clone()) {
                Ok(events) => json!({ "at_us": at_us, "command": kind, "events": events }),
                Err(rejection) => json!({ "at_us": at_us, "command": kind, "rejected": rejection }),
            });
        }
    }
    let live: Vec<Value> = {
        let mut tasks: Vec<_> = s.ledger.tasks().collect();
        tasks.sort_by_key(|t| t.id);
        tasks
            .iter()
            .map(|t| {
                json!({
                    "task": t.id.to_string(),
                    "state": t.state.as_str(),
                    "steps": t.steps.iter().map(|st| json!({"name": st.name, "state": st.state.as_str(), "attempts": st.attempts})).collect::<Vec<_>>(),
                })
            })
            .collect()
    };
    let digest: String = s.ledger.digest().iter().map(|b| format!("{b:02x}")).collect();
    json!({ "description": script.description, "outputs": outputs, "live_tasks": live, "final_digest": digest })
}

#[test]
fn scenario_scripts_match_their_golden_output() {
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(scenarios_dir())
        .expect("read fixtures/scenarios")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.to_string_lossy().ends_with(".golden.json"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 3, "expected the committed scenario scripts");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for path in scripts {
        let script: Script = serde_json::from_str(&std::fs::read_to_string(&path).expect("read script"))
            .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
        let actual = serde_json::to_string_pretty(&run(&script)).expect("json") + "\n";
        let golden_path = path.with_extension("golden.json");
        if update {
            std::fs::write(&golden_path, &actual).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&golden_path)
            .unwrap_or_else(|e| panic!("read {} (run with UPDATE_GOLDEN=1 to create it): {e}", golden_path.display()));
        if expected != actual {
            mismatches.push(format!("{}:\n--- expected\n{expected}\n--- actual\n{actual}", path.display()));
        }
    }
    assert!(mismatches.is_empty(), "golden mismatch:\n{}", mismatches.join("\n"));
}
