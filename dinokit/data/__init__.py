"""Reading images and masks, dataset descriptions (classes.json), checking a dataset, augmentation, image sizes."""
