//! The live page (`/live`) in a real browser. While quotes and trades of four
//! instruments keep arriving, `tests/browser/live_page.mjs` drives Debian's
//! headless chromium through the page (picks two instruments and a field set,
//! applies) and checks that the grid ticks, that only the picked instruments
//! ever show in the grid and the blotter, and that the health panel counts
//! events. Needs `node`, `/usr/bin/chromium` and `tests/browser/node_modules`,
//! which `.ci/setup.sh` installs.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::*;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/browser/live_page.mjs"
);
/// Symbol, venue and a starting bid in cents, for every seeded instrument: the
/// ones not picked are what the filter has to keep out.
const INSTRUMENTS: [(&str, &str, u64); 4] = [
    ("AAPL", "XNAS", 18_900),
    ("MSFT", "XNAS", 41_000),
    ("SPY", "ARCX", 56_000),
    ("VOD.L", "XLON", 7_200),
];
const PICKED: [&str; 2] = ["AAPL", "VOD.L"];
/// The browser script has its own watchdog; this one is for a hung node.
const BROWSER_DEADLINE: Duration = Duration::from_secs(180);

fn price(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// Every 100 ms a quote of each instrument, with a bid that differs from the
/// last, and every 300 ms a trade of each; for as long as it is polled.
async fn feed(app: &TestApp) -> ! {
    let mut seq = 0u64;
    let mut round = 0u64;
    loop {
        let mut events: Vec<Value> = Vec::new();
        for (i, (symbol, venue, start)) in INSTRUMENTS.iter().enumerate() {
            let bid = start + (round * 7 + i as u64 * 3) % 40;
            seq += 1;
            events.push(quote(
                "page",
                seq,
                symbol,
                venue,
                &price(bid),
                &price(bid + 2),
            ));
            if round.is_multiple_of(3) {
                let side = if round.is_multiple_of(2) {
                    "buy"
                } else {
                    "sell"
                };
                seq += 1;
                events.push(trade("page", seq, symbol, venue, &price(bid), "100", side));
            }
        }
        let answer = app.post_json(&json!(events)).await;
        assert_eq!(answer["accepted"], events.len(), "{answer}");
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_live_page_ticks_and_keeps_to_the_picked_instruments(pool: PgPool) {
    let app = spawn_app(pool, 2).await;
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let browser = tokio::process::Command::new(&node)
        .arg(SCRIPT)
        .arg(&app.api)
        .args(PICKED)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `{node}` ({e}); `. .ci/setup.sh` installs node and chromium")
        });

    let output = tokio::select! {
        done = tokio::time::timeout(BROWSER_DEADLINE, browser.wait_with_output()) => done
            .expect("the browser test finishes within its deadline")
            .expect("the browser test's output"),
        never = feed(&app) => never,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the live page's browser test failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n\
         (it needs node, /usr/bin/chromium and tests/browser/node_modules: `. .ci/setup.sh`)",
        output.status
    );
    app.stop().await;
}
