//! Progress of long `pulsectl` work (`replay`, `dlq redrive` and `dlq inspect`'s topic read,
//! `loadgen`, `migrate`, `ledger --from --to`, `audit`'s topic read) on stderr: an indicatif
//! bar with rate and ETA (`unknown` until something moved) on a terminal, plain lines every
//! `--progress-interval` (done/total, rate, ETA) when stderr is a file or pipe, or nothing
//! (`--progress off`). stdout stays the commands' own, machine-readable output. What counts
//! as done and what the total is belongs to each command; this module only shows it.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// A bar when stderr is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Always the bar (drawn only on a terminal).
    Bar,
    /// Always plain lines.
    Plain,
    /// Nothing.
    Off,
}

/// The progress flags, global to every command.
#[derive(Debug, Clone, clap::Args)]
pub struct ProgressArgs {
    /// How long-running commands (replay, dlq redrive and inspect, loadgen, migrate,
    /// ledger --from --to, audit) show progress on stderr: `auto` (a bar with rate and ETA
    /// on a terminal, plain lines otherwise), `bar`, `plain` or `off`.
    #[arg(
        long = "progress",
        global = true,
        value_enum,
        default_value_t = Mode::Auto,
        env = "PULSE_PROGRESS"
    )]
    pub mode: Mode,
    /// How often a plain progress line is printed (`5s`, `1m`).
    #[arg(
        long = "progress-interval",
        global = true,
        default_value = "5s",
        value_parser = parse_interval,
        env = "PULSE_PROGRESS_INTERVAL"
    )]
    pub interval: Duration,
}

impl Default for ProgressArgs {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            interval: Duration::from_secs(5),
        }
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = crate::duration::parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?}: at least 100ms"));
    }
    Ok(d)
}

/// What is drawn, once the mode met the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bar,
    Plain,
    Hidden,
}

/// `mode` on a stderr that is (`tty`) or is not a terminal.
pub fn resolve(mode: Mode, tty: bool) -> Kind {
    match (mode, tty) {
        (Mode::Off, _) => Kind::Hidden,
        (Mode::Plain, _) | (Mode::Auto, false) => Kind::Plain,
        (Mode::Bar, _) | (Mode::Auto, true) => Kind::Bar,
    }
}

/// Rate over a sliding window of observations (done counts at elapsed times), so the ETA
/// follows a slowdown instead of averaging it away.
#[derive(Debug, Clone)]
pub struct RateWindow {
    window: Duration,
    samples: VecDeque<(Duration, u64)>,
}

impl RateWindow {
    /// Starts at 0 done at elapsed 0.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::from([(Duration::ZERO, 0)]),
        }
    }

    /// Records `done` at `at` (elapsed since the start); returns units per second over the
    /// window (None before any time has passed).
    pub fn observe(&mut self, at: Duration, done: u64) -> Option<f64> {
        self.samples.push_back((at, done));
        // Keep the newest sample older than the window as the base.
        while self.samples.len() > 2 && at.saturating_sub(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
        let (t0, d0) = *self.samples.front()?;
        let secs = at.saturating_sub(t0).as_secs_f64();
        (secs > 0.0).then(|| done.saturating_sub(d0) as f64 / secs)
    }
}

/// Time left at `rate` units/s for `total - done` units; None when the total is unknown
/// or nothing moves.
pub fn eta(done: u64, total: Option<u64>, rate: Option<f64>) -> Option<Duration> {
    let left = total?.saturating_sub(done);
    if left == 0 {
        return Some(Duration::ZERO);
    }
    let rate = rate.filter(|r| r.is_finite() && *r > 0.0)?;
    let secs = left as f64 / rate;
    (secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

/// `45s`, `3m05s`, `2h07m`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3_600, (s % 3_600) / 60),
    }
}

fn rate_text(rate: f64) -> String {
    if rate >= 100.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

/// What a plain line shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub done: u64,
    pub total: Option<u64>,
    pub elapsed: Duration,
    /// Units per second (recent).
    pub rate: Option<f64>,
    pub message: String,
}

/// One plain progress line:
/// `replay: 12/40 objects (30%), 3.2 objects/s, ETA 9s, elapsed 4s; published 1200`.
pub fn plain_line(label: &str, unit: &str, s: &Snapshot) -> String {
    let mut line = match s.total {
        Some(total) => {
            // Nothing to do is all done.
            let pct = (u128::from(s.done.min(total)) * 100)
                .checked_div(u128::from(total))
                .unwrap_or(100);
            format!("{label}: {}/{total} {unit} ({pct}%)", s.done)
        }
        None => format!("{label}: {} {unit}", s.done),
    };
    if let Some(rate) = s.rate {
        line.push_str(&format!(", {} {unit}/s", rate_text(rate)));
    }
    if s.total.is_some() {
        match eta(s.done, s.total, s.rate) {
            Some(e) => line.push_str(&format!(", ETA {}", short_duration(e))),
            None => line.push_str(", ETA unknown"),
        }
    }
    line.push_str(&format!(", elapsed {}", short_duration(s.elapsed)));
    if !s.message.is_empty() {
        line.push_str("; ");
        line.push_str(&s.message);
    }
    line
}

/// The line printed when the work is finished (plain mode, and after a bar).
pub fn done_line(label: &str, unit: &str, done: u64, elapsed: Duration, message: &str) -> String {
    let secs = elapsed.as_secs_f64();
    let mut line = format!(
        "{label}: done, {done} {unit} in {}",
        short_duration(elapsed)
    );
    if secs > 0.0 {
        line.push_str(&format!(" ({} {unit}/s)", rate_text(done as f64 / secs)));
    }
    if !message.is_empty() {
        line.push_str("; ");
        line.push_str(message);
    }
    line
}

/// Where the counts live (shared with the plain-line thread).
#[derive(Debug)]
struct State {
    label: String,
    unit: &'static str,
    started: Instant,
    done: AtomicU64,
    /// `u64::MAX`: unknown.
    total: AtomicU64,
    message: Mutex<String>,
    stop: AtomicBool,
}

impl State {
    fn total(&self) -> Option<u64> {
        let t = self.total.load(Ordering::Relaxed);
        (t != u64::MAX).then_some(t)
    }

    fn message(&self) -> String {
        self.message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

enum Sink {
    Bar(ProgressBar),
    Plain(Mutex<Option<JoinHandle<()>>>),
}

struct Inner {
    state: Arc<State>,
    sink: Sink,
    finished: AtomicBool,
}

impl Inner {
    fn stop_thread(&self) {
        if let Sink::Plain(handle) = &self.sink {
            self.state.stop.store(true, Ordering::Relaxed);
            let handle = handle.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(h) = handle {
                h.thread().unpark();
                let _ = h.join();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_thread();
        if let Sink::Bar(bar) = &self.sink
            && !bar.is_finished()
        {
            bar.abandon();
        }
    }
}

/// A handle on one piece of work's progress; clones share it. Hidden handles do nothing.
#[derive(Clone, Default)]
pub struct Progress {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Progress(hidden)"),
            Some(i) => write!(
                f,
                "Progress({}: {}/{:?})",
                i.state.label,
                i.state.done.load(Ordering::Relaxed),
                i.state.total()
            ),
        }
    }
}

/// The bar's template: done/total, percent, rate and ETA when the total is known, a spinner
/// with the count, rate and elapsed time otherwise.
fn bar_template(unit: &str, known_total: bool) -> String {
    if known_total {
        format!(
            "{{prefix}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{percent}}%) {{per_sec:1}} ETA {{eta}} {{wide_msg}}"
        )
    } else {
        format!(
            "{{spinner}} {{prefix}} {{human_pos}} {unit} {{per_sec:1}} {{elapsed}} {{wide_msg}}"
        )
    }
}

fn bar_style(unit: &str, known_total: bool) -> ProgressStyle {
    ProgressStyle::with_template(&bar_template(unit, known_total))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
        .with_key("eta", bar_eta)
}

/// The bar's `{eta}`: what is left at the bar's rate, as in the plain lines; `unknown`
/// while nothing moves (indicatif's own says `0s` until the first unit is done).
fn bar_eta(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let text = match eta(state.pos(), state.len(), Some(state.per_sec())) {
        Some(left) => short_duration(left),
        None => "unknown".to_owned(),
    };
    let _ = w.write_str(&text);
}

impl Progress {
    /// Shows nothing (library callers and tests).
    pub fn hidden() -> Self {
        Self::default()
    }

    /// [`start`](Self::start) with `args`, hidden without.
    pub fn maybe(
        args: Option<&ProgressArgs>,
        label: &str,
        unit: &'static str,
        total: Option<u64>,
    ) -> Self {
        args.map_or_else(Self::hidden, |a| Self::start(a, label, unit, total))
    }

    /// Starts showing `label`'s progress in `unit`s out of `total` (None: not known yet).
    pub fn start(args: &ProgressArgs, label: &str, unit: &'static str, total: Option<u64>) -> Self {
        Self::start_as(
            resolve(args.mode, std::io::stderr().is_terminal()),
            args.interval,
            label,
            unit,
            total,
        )
    }

    fn start_as(
        kind: Kind,
        interval: Duration,
        label: &str,
        unit: &'static str,
        total: Option<u64>,
    ) -> Self {
        let state = Arc::new(State {
            label: label.to_owned(),
            unit,
            started: Instant::now(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total.unwrap_or(u64::MAX)),
            message: Mutex::new(String::new()),
            stop: AtomicBool::new(false),
        });
        let sink = match kind {
            Kind::Hidden => return Self::hidden(),
            Kind::Bar => {
                let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr())
                    .with_style(bar_style(unit, total.is_some()))
                    .with_prefix(label.to_owned());
                bar.enable_steady_tick(Duration::from_millis(200));
                Sink::Bar(bar)
            }
            Kind::Plain => {
                let s = state.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("progress-{label}"))
                    .spawn(move || plain_loop(&s, interval))
                    .ok();
                Sink::Plain(Mutex::new(handle))
            }
        };
        Self {
            inner: Some(Arc::new(Inner {
                state,
                sink,
                finished: AtomicBool::new(false),
            })),
        }
    }

    /// The total, once known (or when it changed).
    pub fn set_total(&self, total: Option<u64>) {
        let Some(i) = &self.inner else { return };
        i.state
            .total
            .store(total.unwrap_or(u64::MAX), Ordering::Relaxed);
        if let Sink::Bar(bar) = &i.sink {
            match total {
                Some(t) => bar.set_length(t),
                None => bar.unset_length(),
            }
            bar.set_style(bar_style(i.state.unit, total.is_some()));
        }
    }

    pub fn inc(&self, n: u64) {
        let Some(i) = &self.inner else { return };
        i.state.done.fetch_add(n, Ordering::Relaxed);
        if let Sink::Bar(bar) = &i.sink {
            bar.inc(n);
        }
    }

    pub fn set_position(&self, done: u64) {
        let Some(i) = &self.inner else { return };
        i.state.done.store(done, Ordering::Relaxed);
        if let Sink::Bar(bar) = &i.sink {
            bar.set_position(done);
        }
    }

    /// Counts shown after the numbers (`published 1200, failed 0`).
    pub fn set_message(&self, message: impl Into<String>) {
        let Some(i) = &self.inner else { return };
        let message = message.into();
        if let Sink::Bar(bar) = &i.sink {
            bar.set_message(message.clone());
        }
        *i.state.message.lock().unwrap_or_else(|e| e.into_inner()) = message;
    }

    /// Prints a line on stderr (above the bar, which is redrawn), even when hidden.
    pub fn println(&self, line: &str) {
        match self.inner.as_ref().map(|i| &i.sink) {
            Some(Sink::Bar(bar)) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    /// Ends the display with the done line (`label: done, N unit in 12s (…/s); message`).
    pub fn finish(&self) {
        let Some(i) = &self.inner else { return };
        if i.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        i.stop_thread();
        let s = &i.state;
        let line = done_line(
            &s.label,
            s.unit,
            s.done.load(Ordering::Relaxed),
            s.started.elapsed(),
            &s.message(),
        );
        match &i.sink {
            Sink::Bar(bar) => {
                bar.finish_and_clear();
                eprintln!("{line}");
            }
            Sink::Plain(_) => eprintln!("{line}"),
        }
    }
}

/// Prints a plain line every `interval` until stopped.
fn plain_loop(s: &State, interval: Duration) {
    let mut rates = RateWindow::new(Duration::from_secs(30));
    let mut next = interval;
    loop {
        let elapsed = s.started.elapsed();
        if elapsed < next {
            std::thread::park_timeout(next - elapsed);
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            continue;
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        next += interval;
        let done = s.done.load(Ordering::Relaxed);
        let snapshot = Snapshot {
            done,
            total: s.total(),
            elapsed,
            rate: rates.observe(elapsed, done),
            message: s.message(),
        };
        eprintln!("{}", plain_line(&s.label, s.unit, &snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn auto_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() {
        assert_eq!(resolve(Mode::Auto, true), Kind::Bar);
        assert_eq!(resolve(Mode::Auto, false), Kind::Plain);
        assert_eq!(resolve(Mode::Plain, true), Kind::Plain);
        assert_eq!(resolve(Mode::Bar, false), Kind::Bar);
        assert_eq!(resolve(Mode::Off, true), Kind::Hidden);
    }

    #[test]
    fn the_eta_is_what_is_left_at_the_current_rate() {
        assert_eq!(eta(30, Some(100), Some(10.0)), Some(7 * S));
        assert_eq!(eta(100, Some(100), None), Some(Duration::ZERO));
        assert_eq!(eta(120, Some(100), Some(1.0)), Some(Duration::ZERO));
        assert_eq!(eta(0, None, Some(10.0)), None, "no total, no ETA");
        assert_eq!(eta(5, Some(100), Some(0.0)), None, "nothing moves");
        assert_eq!(eta(5, Some(100), None), None);
    }

    #[test]
    fn the_rate_follows_the_last_window_not_the_whole_run() {
        let mut r = RateWindow::new(10 * S);
        assert_eq!(r.observe(Duration::ZERO, 0), None);
        assert_eq!(r.observe(5 * S, 100), Some(20.0));
        assert_eq!(r.observe(10 * S, 200), Some(20.0));
        // It slows to 2/s: after the window has passed, only the slow part counts.
        assert_eq!(r.observe(15 * S, 210), Some(11.0), "(210 - 100) / 10 s");
        assert_eq!(r.observe(20 * S, 220), Some(2.0));
        assert_eq!(r.observe(25 * S, 230), Some(2.0));
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(Duration::from_millis(400)), "0s");
        assert_eq!(short_duration(45 * S), "45s");
        assert_eq!(short_duration(185 * S), "3m05s");
        assert_eq!(short_duration(7_620 * S), "2h07m");
    }

    #[test]
    fn a_plain_line_shows_done_total_rate_eta_and_the_counts() {
        let s = Snapshot {
            done: 12,
            total: Some(40),
            elapsed: 4 * S,
            rate: Some(3.2),
            message: "published 1200".into(),
        };
        assert_eq!(
            plain_line("replay", "objects", &s),
            "replay: 12/40 objects (30%), 3.2 objects/s, ETA 9s, elapsed 4s; published 1200"
        );
        let unknown = Snapshot {
            total: None,
            rate: Some(250.0),
            message: String::new(),
            ..s.clone()
        };
        assert_eq!(
            plain_line("dlq", "records", &unknown),
            "dlq: 12 records, 250 records/s, elapsed 4s"
        );
        let stalled = Snapshot {
            rate: Some(0.0),
            message: String::new(),
            ..s
        };
        assert_eq!(
            plain_line("loadgen", "events", &stalled),
            "loadgen: 12/40 events (30%), 0.0 events/s, ETA unknown, elapsed 4s"
        );
        let nothing = Snapshot {
            done: 0,
            total: Some(0),
            elapsed: S,
            rate: None,
            message: String::new(),
        };
        assert_eq!(
            plain_line("dlq redrive", "records", &nothing),
            "dlq redrive: 0/0 records (100%), ETA 0s, elapsed 1s"
        );
        assert_eq!(
            done_line("migrate", "migrations", 3, 2 * S, "applied 3"),
            "migrate: done, 3 migrations in 2s (1.5 migrations/s); applied 3"
        );
    }

    #[test]
    fn the_bar_templates_are_valid() {
        for known in [true, false] {
            let t = bar_template("objects", known);
            assert!(ProgressStyle::with_template(&t).is_ok(), "{t}");
            assert!(t.contains("{per_sec:1}") && t.contains("objects"), "{t}");
        }
        assert!(bar_template("x", true).contains("ETA {eta}"));
    }

    /// A terminal that keeps what is written to it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl Screen {
        fn take(&self) -> String {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            160
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_bar_shows_rate_and_eta_and_an_unknown_eta_before_anything_moved() {
        let screen = Screen::default();
        let bar = ProgressBar::with_draw_target(
            Some(90),
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
        )
        .with_style(bar_style("events", true))
        .with_prefix("loadgen");
        bar.tick();
        let first = screen.take();
        assert!(
            first.contains("loadgen [") && first.contains("0/90 events (0%) 0/s ETA unknown"),
            "{first:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
        bar.set_position(9);
        let moving = screen.take();
        let moved = moving.lines().last().unwrap_or_default();
        assert!(
            moved.contains("[===>") && moved.contains("9/90 events (10%) "),
            "{moving:?}"
        );
        let eta = moved.split(" ETA ").nth(1).unwrap_or_default().trim();
        assert!(
            moved.contains("/s ETA ") && !["", "0s", "unknown"].contains(&eta),
            "a rate and a time left: {moving:?}"
        );
        bar.set_position(90);
        assert!(screen.take().contains("90/90 events (100%)"));
    }

    #[test]
    fn a_hidden_handle_takes_every_call() {
        let p = Progress::hidden();
        p.set_total(Some(3));
        p.inc(1);
        p.set_position(2);
        p.set_message("x");
        p.finish();
        let p = Progress::start_as(Kind::Hidden, S, "x", "things", None);
        assert!(p.inner.is_none());
    }

    #[test]
    fn the_plain_thread_stops_on_finish_and_on_drop() {
        let p = Progress::start_as(Kind::Plain, Duration::from_millis(100), "t", "u", Some(2));
        p.inc(2);
        p.finish();
        p.finish();
        let dropped = Progress::start_as(Kind::Plain, Duration::from_secs(60), "t", "u", None);
        let started = Instant::now();
        drop(dropped);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "drop joins at once"
        );
    }
}
