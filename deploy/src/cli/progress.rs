//! The progress bar of `--wait`: the job's progress and the step it is at.

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

pub struct JobBar(ProgressBar);

impl JobBar {
    pub fn new() -> JobBar {
        let bar = ProgressBar::new(100);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{bar:30}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        JobBar(bar)
    }

    /// Show a job's view (`GET /v1/jobs/<uuid>`).
    pub fn show(&self, job: &Value) {
        self.0
            .set_position(job["progress"].as_u64().unwrap_or(0).min(100));
        let op = job["operation"].as_str().unwrap_or("job");
        let step = job["step"].as_str().unwrap_or("");
        self.0.set_message(if step.is_empty() {
            op.to_string()
        } else {
            format!("{op}: {step}")
        });
    }

    pub fn finish(&self, how: &str) {
        self.0.set_position(100);
        self.0.finish_with_message(how.to_string());
    }
}
