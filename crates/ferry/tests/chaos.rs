//! `ferry bench chaos` in the suite: five random faults (a fixed seed, so a failure
//! can be repeated with `ferry bench chaos --seed 15 --trials 5`) against a lab of
//! three hosts running two HA VMs with writers. Through every trial no VM runs twice,
//! every VM runs again, and no acknowledged write is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use ferry_lab::harness::chaos;

#[tokio::test]
async fn five_random_faults_never_run_a_vm_twice_lose_a_write_or_leave_a_vm_down() {
    let (mut lab, _guard, _client) = common::lab(26, 3).await;
    let report = chaos::run(&mut lab, 5, 15, |trial| eprintln!("{trial:?}"))
        .await
        .unwrap();
    for trial in &report.trials {
        assert!(trial.clean(), "trial {trial:#?}");
        assert!(
            trial.acknowledged > 0,
            "trial {} wrote nothing",
            trial.number
        );
    }
    assert_eq!(report.trials.len(), 5);
}
