# A small network on R's iris data: dense (4 -> 16), batch normalization, ReLU,
# dense (16 -> 3), softmax; mini-batch gradient descent written in base R, with
# cbn's layer for the normalization (forward and backward). Prints the test
# accuracy. Run: Rscript "$(Rscript -e 'cat(system.file("examples", "iris.R", package = "cbn"))')"
library(cbn)

set.seed(42)
x_all <- as.matrix(iris[, 1:4])
labels <- as.integer(iris$Species)
test <- sort(unlist(lapply(split(seq_along(labels), labels), sample, size = 10)))
train <- setdiff(seq_along(labels), test)
one_hot <- diag(3)[labels, ]

dense <- function(n_in, n_out) {
  list(w = matrix(rnorm(n_in * n_out, sd = sqrt(2 / n_in)), n_in, n_out), b = numeric(n_out))
}
hidden <- dense(4, 16)
output <- dense(16, 3)
bn <- layer_batch_normalization(momentum = 0.9)

forward <- function(x, training) {
  h <- sweep(x %*% hidden$w, 2, hidden$b, `+`)
  z <- bn(h, training = training)
  a <- pmax(z, 0)
  logits <- sweep(a %*% output$w, 2, output$b, `+`)
  p <- exp(logits - apply(logits, 1, max))
  list(a = a, z = z, p = p / rowSums(p))
}

accuracy <- function(rows) {
  p <- forward(x_all[rows, , drop = FALSE], training = FALSE)$p
  mean(max.col(p) == labels[rows])
}

rate <- 0.1
for (epoch in 1:60) {
  for (batch in split(sample(train), rep(1:8, length.out = length(train)))) {
    x <- x_all[batch, , drop = FALSE]
    f <- forward(x, training = TRUE)
    d_logits <- (f$p - one_hot[batch, ]) / length(batch)
    d_a <- d_logits %*% t(output$w)
    d_h <- bn$backward(d_a * (f$z > 0))
    output$w <- output$w - rate * t(f$a) %*% d_logits
    output$b <- output$b - rate * colSums(d_logits)
    hidden$w <- hidden$w - rate * t(x) %*% d_h
    hidden$b <- hidden$b - rate * colSums(d_h)
    set_weights(bn, list(bn$gamma - rate * bn$gradients$gamma,
                         bn$beta - rate * bn$gradients$beta, bn$moving_mean, bn$moving_variance))
  }
}
print(bn)
cat(sprintf("iris: train accuracy %.3f, test accuracy %.3f (%d test flowers)\n",
            accuracy(train), accuracy(test), length(test)))
