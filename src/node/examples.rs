//! Examples on the ring (exo classic's `enqueue_example` / `process_example`): a batch enters
//! at the node holding the model's first layer, each node runs its layers over the whole
//! sequences and passes the hidden states on with `SendExample`, and the last shard's loss
//! travels back as the answer to each call. When training, each answer also carries the
//! gradient for the caller's output: the node back-propagates it through its own layers,
//! steps its adapters and answers with the gradient for its own input.

use futures::future::BoxFuture;

use super::Node;
use crate::engine::example::{Example, ExampleLoss, ExampleOutput};
use crate::error::{Error, Result};
use crate::shard::Shard;

impl Node {
    /// Runs one batch of `base`'s model through the ring, from the node holding its first
    /// layer, and returns its loss.
    pub async fn enqueue_example(
        &self,
        base: &Shard,
        example: Example,
        train: bool,
        request_id: Option<String>,
    ) -> Result<ExampleLoss> {
        let base = Shard::new(base.model_id.clone(), 0, base.n_layers - 1, base.n_layers);
        base.validate()?;
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let (node_id, shard) = self.example_stage(&base, 0)?;
        self.run_example_on(node_id, shard, example, train, request_id).await
    }

    /// Runs this node's `shard` over `example`, then the rest of the ring after it; returns
    /// the loss the last shard computed.
    pub async fn process_example(
        &self,
        shard: &Shard,
        example: Example,
        train: bool,
        request_id: &str,
    ) -> Result<ExampleLoss> {
        let output = {
            let _turn =
                self.compute.acquire().await.map_err(|_| Error::RequestFailed("the node stopped".into()))?;
            if train {
                self.engine.train_example(request_id, shard, &example).await?
            } else {
                self.engine.evaluate_example(shard, &example).await?
            }
        };
        let hidden = match output {
            ExampleOutput::Loss(loss) => return Ok(loss),
            ExampleOutput::Hidden(hidden) => hidden,
        };
        let (node_id, next) = self.example_stage(shard, shard.end_layer + 1)?;
        let reply = self
            .run_example_on(node_id, next, example.with_input(hidden), train, request_id.to_string())
            .await;
        if !train {
            return reply;
        }
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                self.engine.finish_request(request_id).await;
                return Err(e);
            }
        };
        let output_grad = reply.grads.ok_or_else(|| {
            Error::Peer(format!("the shard after layer {} sent back no gradient", shard.end_layer))
        })?;
        let grads = {
            let _turn =
                self.compute.acquire().await.map_err(|_| Error::RequestFailed("the node stopped".into()))?;
            self.engine.backward_example(request_id, shard, output_grad).await?
        };
        Ok(ExampleLoss { loss: reply.loss, grads })
    }

    /// The node and shard holding layer `layer` of `shard`'s model, by the ring's partition.
    fn example_stage(&self, shard: &Shard, layer: i32) -> Result<(String, Shard)> {
        let base = Shard::new(shard.model_id.clone(), 0, shard.n_layers - 1, shard.n_layers);
        self.assignments(&base).into_iter().find(|(_, s)| s.start_layer == layer).ok_or_else(|| {
            Error::InvalidArgument(format!("no node of the ring holds layer {layer} of {}", shard.model_id))
        })
    }

    /// Runs the example's next stage here, or sends it to the peer holding it.
    fn run_example_on(
        &self,
        node_id: String,
        shard: Shard,
        example: Example,
        train: bool,
        request_id: String,
    ) -> BoxFuture<'_, Result<ExampleLoss>> {
        Box::pin(async move {
            if node_id == self.id {
                return self.process_example(&shard, example, train, &request_id).await;
            }
            let peer = self.membership.peer(&node_id).ok_or_else(|| {
                Error::Peer(format!("peer {node_id}, which holds {shard:?}, is not connected"))
            })?;
            peer.send_example(&shard, example, train, &request_id).await
        })
    }
}
