//! openraft's own storage test suite, run against Tandem's RocksDB log store
//! and state machine.

use openraft::StorageError;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use tandem::raft::LogStore;
use tandem::raft::StateMachine;
use tandem::raft::TypeConfig;
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = tandem::raft::open_store(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_store_passes_openraft_suite() {
    Suite::test_all(RocksBuilder).await.expect("openraft storage suite");
}
