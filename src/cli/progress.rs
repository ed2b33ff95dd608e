//! A progress bar on stderr for `push`, `pull`, `sync` and `clone`: records and bytes moved,
//! against the total once the transfer knows it. Drawn only when stderr is a terminal, and
//! cleared when the transfer ends, so scripts and logs see only the summary line.

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use capsulefs::sync::Progress;

pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(doing: &str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {pos} records, {msg} [{elapsed}]")
                .expect("a valid template"),
        );
        bar.set_prefix(doing.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Self(bar)
    }
}

impl Progress for Bar {
    fn expect(&self, records: u64) {
        self.0.set_length(self.0.position() + records);
        self.0.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} records, {msg}, {eta} left")
                .expect("a valid template")
                .progress_chars("=> "),
        );
    }

    fn moved(&self, records: u64, bytes: u64) {
        self.0.set_position(records);
        self.0.set_message(HumanBytes(bytes).to_string());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
