"""The model: the recipe's features, training, the explore profile, drift, batch scoring."""
